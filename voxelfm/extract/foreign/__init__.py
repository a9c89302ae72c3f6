"""Adapters for other CT foundation models behind the ``FeatureExtractor`` interface.

One module per model (``merlin``, ``ct_fm``, ``m3d_clip``, ``ct_clip``, ``radfm``), each with
a factory that ``voxelfm.extract.backbones`` registers as a backbone kind. Each adapter builds
the model's architecture in plain PyTorch / MONAI, loads weights only from a local file the
user names, and applies the model's own published preprocessing to our canonical HU volumes.
"""
