"""Simulate one CT acquisition of a phantom: sample the anatomy, blur, add scanner noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from voxelfm.conventions import HU_MAX, HU_MIN
from voxelfm.synth.anatomy import Phantom
from voxelfm.synth.geometry import PatientPose, ScanGeometry
from voxelfm.synth.raster import rasterise

# Reconstruction kernels correlate CT noise over about a voxel; white noise would look
# nothing like a scan and would be trivially separable from anatomy.
_NOISE_CORRELATION_VOXELS = 0.7


@dataclass(frozen=True)
class Acquisition:
    """What one scan adds on top of the patient's anatomy."""

    noise_sd: float  # HU, standard deviation of the final correlated noise
    contrast: float  # contrast phase: 0 unenhanced .. 1 arterial (blood pool, kidneys)
    psf_sigma_voxels: float  # scanner blur, which also gives edges a partial-volume ramp
    lesion_growth: float  # lesion size relative to the patient's baseline scan
    noise_seed: int


@dataclass(frozen=True, eq=False)
class RenderedScan:
    hu: np.ndarray  # (I, J, K) int16, clipped to the canonical HU range
    labels: np.ndarray  # (I, J, K) uint8, values from anatomy.LABELS, 0 elsewhere
    lesion_voxels: np.ndarray  # (n_lesions,) voxels each of phantom.lesions covers here


def render_scan(
    phantom: Phantom, geometry: ScanGeometry, pose: PatientPose, acquisition: Acquisition
) -> RenderedScan:
    """Sample ``phantom`` lying at ``pose`` on ``geometry`` as the scanner would see it.

    The label map is the noise-free truth at voxel centres; the image is the same anatomy
    blurred by the point-spread function, plus correlated Gaussian noise.
    """
    structures = phantom.structures(acquisition.lesion_growth)
    instances, ideal_hu = rasterise(
        structures,
        geometry.shape,
        geometry.index_to_patient(pose),
        body_interior=phantom.body_interior,
        texture=phantom.texture,
        contrast=acquisition.contrast,
    )
    label_of_instance = np.array([s.label for s in structures] + [0], dtype=np.uint8)
    labels = label_of_instance[instances]  # instance -1 (air) picks the trailing 0
    voxels_per_instance = np.bincount(instances.ravel() + 1, minlength=len(structures) + 1)[1:]

    rng = np.random.default_rng(acquisition.noise_seed)
    noise = gaussian_filter(
        rng.standard_normal(geometry.shape, dtype=np.float32), _NOISE_CORRELATION_VOXELS
    )
    noise *= acquisition.noise_sd / noise.std()
    blurred = gaussian_filter(ideal_hu, acquisition.psf_sigma_voxels)
    hu = np.clip(np.rint(blurred + noise), HU_MIN, HU_MAX).astype(np.int16)
    return RenderedScan(
        hu=hu, labels=labels, lesion_voxels=voxels_per_instance[len(phantom.anatomy) :]
    )
