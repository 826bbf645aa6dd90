"""Building blocks shared by the model files: linear layers, norms, rotary, activations."""
