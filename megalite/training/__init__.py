"""Training: the step, optimizer, mixed precision, data, checkpoints, metrics."""
