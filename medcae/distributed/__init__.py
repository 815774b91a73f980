"""The Ray layer: Ray Data extraction, Ray Train CAE training, pipeline orchestration.

Everything here is a thin driver over the Ray-free core in :mod:`medcae`.
"""
