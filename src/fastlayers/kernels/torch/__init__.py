"""Fast plain-PyTorch kernel paths (the default backend on CPU)."""
