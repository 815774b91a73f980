"""medcae: convolutional auto-encoders on frozen CNN feature maps for few-label medical imaging.

The core (this package, minus ``medcae.distributed``) is plain PyTorch / NumPy / scikit-learn
and imports no Ray; ``medcae.distributed`` puts Ray Data, Train, Tune and Serve on top.
"""

__version__ = "0.1.0"
