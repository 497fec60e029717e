"""Training: data, schedule, trainer loop, checkpoints, distributed."""
