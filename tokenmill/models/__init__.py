"""Model implementations (our own PyTorch code) and their loading."""
