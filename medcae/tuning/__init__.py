"""The hyperparameter search space as data, and the search report (no Ray; the Ray Tune driver is
:mod:`medcae.distributed.tune`)."""
