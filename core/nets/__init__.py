"""The networks: building, saving and loading a model folder (PyTorch)."""
