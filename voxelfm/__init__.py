"""VoxelFM: a reproducible pipeline for a 3D CT foundation model.

Importing the package is cheap on purpose (no torch, no SimpleITK): the Snakefile and the
command-line tool import it at parse time. The Python API (``load_backbone``,
``features_from_folder``; see ``voxelfm.api``) is loaded on first use.
"""

__version__ = "0.1.0"

_API = ("load_backbone", "features_from_folder", "Backbone")
__all__ = ["Backbone", "__version__", "features_from_folder", "load_backbone"]


def __getattr__(name: str):
    # PEP 562: voxelfm.api loads on first use; torch only once a backbone is built.
    if name in _API:
        from voxelfm import api

        return getattr(api, name)
    raise AttributeError(f"module 'voxelfm' has no attribute {name!r}")
