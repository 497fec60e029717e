"""Training losses: flow matching, GT-aligned identity loss, contrastive (InfoNCE) loss."""
