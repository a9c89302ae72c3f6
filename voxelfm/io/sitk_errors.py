"""Turning SimpleITK's multi-line C++ exceptions into one-line reasons."""

from __future__ import annotations

import re

# "ITK ERROR: MetaImageIO(0x55d5faad0ac0): " / "sitk::ERROR: " prefixes carry no information.
_PREFIX = re.compile(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |sitk::ERROR: )")


def itk_error_reason(error: Exception) -> str:
    """The informative line of a SimpleITK exception.

    That is the last line that is neither the C++ source location nor ITK's "Reason:"
    line, which reports a stale errno (often "No such file or directory" for a file that
    exists but is truncated).
    """
    lines = [
        _PREFIX.sub("", line.strip())
        for line in str(error).splitlines()
        if line.strip()
        and not line.startswith("Exception thrown in SimpleITK")
        and not line.startswith("Reason:")
    ]
    return lines[-1] if lines else type(error).__name__
