"""The statistics every table, report and card reads: metrics and their intervals."""
