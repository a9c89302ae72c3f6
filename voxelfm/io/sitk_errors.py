"""Turning SimpleITK's multi-line C++ exceptions into one-line reasons."""

from __future__ import annotations


def itk_error_reason(error: Exception) -> str:
    """The informative last line of a SimpleITK exception (the rest is C++ source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
