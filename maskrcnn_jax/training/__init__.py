"""Training: pure losses of the model's training outputs, the optimizer, the data-parallel step."""
