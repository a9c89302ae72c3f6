"""VoxelFM: a reproducible pipeline for a 3D CT foundation model.

Importing the package is cheap on purpose (no torch, no SimpleITK): the Snakefile and the
command-line tool import it at parse time.
"""

__version__ = "0.1.0"
