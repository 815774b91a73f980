"""How well a model does: the fit-on-a-budget protocol, the method comparison, the evaluation
report, and writing a fitted model as a bundle (no Ray)."""
