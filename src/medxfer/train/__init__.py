"""Training: compute settings, optimizer and schedule, checkpoints, the loop."""
