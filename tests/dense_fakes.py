"""Stand-ins for EmbeddingStore and VolumeStore holding in-memory arrays, for the dense
runner tests (only the methods the runners call)."""

from __future__ import annotations

import numpy as np


class FakeEmbeddings:
    """The parts of EmbeddingStore the dense runners read."""

    def __init__(self, grids, scan_ids, patient_ids, patch_size=4, spacing=(2.0, 2.0, 2.0)):
        self.grids = dict(zip(scan_ids, grids))
        self.scan_ids, self.patient_ids = list(scan_ids), list(patient_ids)
        self.patch_size, self.spacing = patch_size, spacing
        self.attrs = {"backbone": {"name": "fake"}}
        self.path = "fake.zarr"

    def global_features(self, kind="cls", scan_ids=None):
        return np.stack([g[0].mean((0, 1, 2)) for g in self.grids.values()])

    def has_patch_tokens(self, scan_id):
        return True

    def patch_tokens(self, scan_id):
        return self.grids[scan_id]

    def patch_geometry(self, scan_id):
        tokens, affine = self.grids[scan_id]
        p = self.patch_size
        return {
            "grid_affine": affine.tolist(),
            "grid_shape": list(tokens.shape[:3]),
            "volume_shape": [g * p for g in tokens.shape[:3]],
            "spacing": list(self.spacing),
            "origin": (affine[:3, 3] - np.asarray(self.spacing) * (p - 1) / 2).tolist(),
        }


class FakeVolumes:
    """The parts of VolumeStore the dense runners read: images, labels, geometry."""

    def __init__(self, images, labels, spacing, origins):
        self.images, self.labels = images, labels
        self.spacing, self.origins = spacing, origins

    def __contains__(self, scan_id):
        return scan_id in self.images

    def attrs(self, scan_id):
        return {"spacing": list(self.spacing), "origin": list(self.origins[scan_id])}

    def shape(self, scan_id):
        return self.images[scan_id].shape

    def read_volume(self, scan_id):
        return self.images[scan_id]

    def label_names(self, scan_id):
        return list(self.labels.get(scan_id, {}))

    def read_label(self, scan_id, name):
        return self.labels[scan_id][name]
