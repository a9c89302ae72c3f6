"""Smooth random texture defined in patient space.

Tissue texture has to belong to the patient, not to the scan: a repeat scan with another
grid, spacing and orientation must show the same lung pattern. A sum of random plane waves
is a closed-form function of position, so any grid samples it consistently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class RandomField:
    """Zero-mean, unit-variance field f(p) = sqrt(2 / K) * sum_k cos(w_k . p + phi_k)."""

    wavevectors: np.ndarray  # (K, 3) rad/mm
    phases: np.ndarray  # (K,) rad

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 3) in patient mm -> field values (...)."""
        # float32 is ample for a texture and halves the cost of the cosines, which dominate.
        waves = np.cos(
            points.astype(np.float32) @ self.wavevectors.T.astype(np.float32)
            + self.phases.astype(np.float32)
        )  # (..., K)
        return waves.sum(axis=-1) * np.float32(np.sqrt(2.0 / len(self.phases)))


def random_field(
    rng: np.random.Generator,
    *,
    n_waves: int = 12,
    wavelength_range_mm: tuple[float, float] = (8.0, 40.0),
) -> RandomField:
    """Draw a field whose waves have random directions and wavelengths in the given range."""
    directions = rng.normal(size=(n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(*wavelength_range_mm, size=n_waves)
    wavevectors = directions * (2.0 * np.pi / wavelengths)[:, None]
    return RandomField(wavevectors=wavevectors, phases=rng.uniform(0.0, 2.0 * np.pi, n_waves))
