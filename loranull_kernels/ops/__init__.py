"""One module per operation: validation, dispatch to a backend, autograd and torch.library registration."""
