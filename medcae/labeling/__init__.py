"""Which images to label next: the strategies, the suggestion files and the simulated labeling
study with its report (no Ray)."""
