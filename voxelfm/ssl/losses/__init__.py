"""Self-distillation losses, one per module, as in dinov2."""
