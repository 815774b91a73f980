"""The frozen backbone and what is trained on it: backbones, runtimes, feature taps, the CAE, its
training loop and checkpoints, the classifier and the representations it may read (no Ray)."""
