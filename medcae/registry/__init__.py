"""Model versions: MLflow's Model Registry behind ``--register``, ``medcae models`` and
``medcae serve --model``."""
