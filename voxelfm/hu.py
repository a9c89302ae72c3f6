"""HU -> network input: the one intensity standardisation of pretraining and extraction.

Pretraining (``voxelfm.ssl.multicrop``) and feature extraction
(``voxelfm.extract.normalisation``) both call :func:`standardise_hu`, so a backbone sees at
inference exactly the input mapping it was trained with. It lives in the base layer because
both of those layers need it and neither may import the other's side of it.

Nothing is imported at module level: the function only uses the tensor's own methods, so
importing this module stays cheap in every data-loading worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def standardise_hu(
    hu: torch.Tensor, hu_clip: tuple[float, float] | None, mean: float, std: float
) -> torch.Tensor:
    """Clip HU to ``hu_clip`` (None: no clip), then standardise: ``(hu - mean) / std``."""
    if hu_clip is not None:
        hu = hu.clamp(*hu_clip)
    return (hu - mean) / std
