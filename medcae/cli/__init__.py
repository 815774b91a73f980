"""The ``medcae`` command: its arguments, one module per job, error lines, logs and tracking.

The job modules import Ray inside ``main``, so ``medcae --help`` and input errors stay fast."""
