"""Self-distillation components for VoxelFM pretraining (DINO + iBOT + KoLeo).

Modules are imported individually (``from voxelfm.ssl.losses.dino_clstoken_loss import
DINOLoss``) so that each stays cheap to import on its own.
"""
