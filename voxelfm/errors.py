"""User-facing errors.

Every error a user can cause (bad file, bad manifest, bad config) is raised as a
``VoxelFMError`` whose message is one line naming the offending path and the reason. The
command-line tool prints that line and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import os


class VoxelFMError(Exception):
    """A problem with the user's input, reported as one line."""


class InputError(VoxelFMError):
    """A specific input file or folder cannot be used."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # keep it on one line
        super().__init__(f"{self.path}: {self.reason}")
