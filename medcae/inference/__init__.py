"""A trained model in use: the bundle, the one Predictor, the model card, explanations and the
prediction table (no Ray)."""
