"""Adapters for other CT foundation models behind the ``FeatureExtractor`` interface.

Importing this package registers one backbone kind per model (``merlin``, ``ct_fm``,
``m3d_clip``, ``ct_clip``, ``radfm``). Each adapter builds the model's architecture in
plain PyTorch / MONAI, loads weights only from a local file the user names, and applies the
model's own published preprocessing to our canonical HU volumes.
"""

import importlib

ADAPTER_MODULES = ("merlin", "ct_fm", "m3d_clip", "ct_clip", "radfm")


def register_all() -> None:
    """Import every adapter module present (each registers its kind on import)."""
    for module in ADAPTER_MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{module}":
                raise


register_all()
