"""Multi-crop sampling from the Zarr store, the resumable sharded sampler and the collate."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch

from voxelfm.errors import VoxelFMError
from voxelfm.ssl.data import (
    InfiniteShardedSampler,
    SSLDataset,
    build_ssl_dataloader,
    collate_ssl_batch,
    decode_sample_key,
    encode_sample_key,
)
from voxelfm.ssl.masking import BlockMaskGenerator3D
from voxelfm.ssl.multicrop import MultiCropAugmentation, MultiCropSettings
from voxelfm.store import VolumeStore, write_scan
from voxelfm.train.config import resolve_ssl_config
from voxelfm.volume import CanonicalVolume

RAMP_SHAPE = (24, 24, 24)
RAMP_SLOPES = (1, 4, 16)  # HU per voxel along x, y, z: tells the axes apart in any crop
TINY_SHAPE = (6, 10, 4)
TINY_HU = 300
CONSTANT_HU = 150

# Small crops keep every test fast; the recipe's defaults are exercised by the settings tests.
SMALL = {"global_crop_size": 8, "local_crop_size": 4, "n_local_crops": 2}


def ramp_volume(shape: tuple[int, int, int]) -> np.ndarray:
    x, y, z = np.indices(shape)
    return (-200 + RAMP_SLOPES[0] * x + RAMP_SLOPES[1] * y + RAMP_SLOPES[2] * z).astype(np.int16)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> VolumeStore:
    shard = tmp_path_factory.mktemp("ssl_store") / "shard_000.zarr"
    rng = np.random.default_rng(0)
    images = {
        "ramp": ramp_volume(RAMP_SHAPE),
        "noise_a": rng.integers(-1000, 1500, size=(20, 28, 24)).astype(np.int16),
        "noise_b": rng.integers(-1000, 1500, size=(32, 24, 20)).astype(np.int16),
        "constant": np.full((12, 12, 12), CONSTANT_HU, dtype=np.int16),
        "tiny": np.full(TINY_SHAPE, TINY_HU, dtype=np.int16),
    }
    for scan_id, image in images.items():
        volume = CanonicalVolume(image=image, spacing=(1.5, 1.5, 1.5), origin=(0.0, 0.0, 0.0))
        write_scan(shard, scan_id, f"patient_{scan_id}", volume)
    return VolumeStore(shard)


def as_hu(crop: torch.Tensor, settings: MultiCropSettings) -> torch.Tensor:
    return crop * settings.normalisation_std + settings.normalisation_mean


def record_reads(store: VolumeStore, monkeypatch) -> list[tuple[tuple, tuple, tuple]]:
    """Log (start, size, returned shape) of every read_crop; fail on any whole-volume read."""
    reads = []
    real_read_crop = store.read_crop

    def recording_read_crop(scan_id, start, size):
        region = real_read_crop(scan_id, start, size)
        reads.append((tuple(start), tuple(size), region.shape))
        return region

    def recording_read_crops(scan_id, regions):
        return [recording_read_crop(scan_id, start, size) for start, size in regions]

    def forbidden_read_volume(scan_id):
        raise AssertionError("the augmentation read a whole volume")

    monkeypatch.setattr(store, "read_crop", recording_read_crop)
    monkeypatch.setattr(store, "read_crops", recording_read_crops)
    monkeypatch.setattr(store, "read_volume", forbidden_read_volume)
    return reads


# --- crops ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        MultiCropSettings(global_crop_size=16, local_crop_size=8, n_local_crops=3),
        MultiCropSettings(global_crop_size=12, local_crop_size=6, n_local_crops=0),
        MultiCropSettings(
            global_crop_size=10,
            local_crop_size=4,
            n_local_crops=5,
            reference_extent=40,
            aspect_ratio_range=(0.5, 2.0),
            noise_std=10.0,
            global_window_probability=(1.0, 1.0),
        ),
    ],
    ids=["recipe-like", "no-local-crops", "anisotropic-padded-noisy"],
)
def test_crop_shapes(store, settings):
    crops = MultiCropAugmentation(settings)(store, "noise_a", np.random.default_rng(0))

    g, l = settings.global_crop_size, settings.local_crop_size
    assert crops["global_crops"].shape == (2, 1, g, g, g)
    assert crops["local_crops"].shape == (settings.n_local_crops, 1, l, l, l)
    assert crops["global_crops"].dtype == crops["local_crops"].dtype == torch.float32
    assert torch.isfinite(crops["global_crops"]).all()


def test_only_the_planned_regions_are_read(store, monkeypatch):
    settings = MultiCropSettings(**SMALL, aspect_ratio_range=(0.5, 2.0))
    augmentation = MultiCropAugmentation(settings)
    reads = record_reads(store, monkeypatch)

    augmentation(store, "noise_b", np.random.default_rng(7))

    plan = augmentation.plan(store.shape("noise_b"), np.random.default_rng(7))
    planned = [(c.start, c.size, c.size) for c in (*plan.global_crops, *plan.local_crops)]
    assert reads == planned
    # The aspect-ratio range really produces non-cubic regions.
    assert any(len(set(size)) > 1 for _, size, _ in reads)


def test_crops_are_a_pure_function_of_the_generator(store):
    augmentation = MultiCropAugmentation(MultiCropSettings(**SMALL))

    first = augmentation(store, "noise_a", np.random.default_rng(3))
    again = augmentation(store, "noise_a", np.random.default_rng(3))
    other = augmentation(store, "noise_a", np.random.default_rng(4))

    for key in ("global_crops", "local_crops"):
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])
    assert not torch.equal(first["global_crops"][0], first["global_crops"][1])


def test_dataset_sample_depends_only_on_seed_epoch_and_scan(store):
    dataset = SSLDataset(store, MultiCropAugmentation(MultiCropSettings(**SMALL)), base_seed=5)
    restarted = pickle.loads(pickle.dumps(dataset))  # as a worker or a new process sees it
    n = len(dataset)
    key = encode_sample_key(epoch=3, scan_index=1, n_scans=n)

    sample = dataset[key]
    assert sample["sample_key"] == key and sample["scan_id"] == dataset.scan_ids[1]
    assert torch.equal(sample["global_crops"], restarted[key]["global_crops"])
    next_epoch = dataset[encode_sample_key(4, 1, n)]
    assert not torch.equal(sample["global_crops"], next_epoch["global_crops"])
    other_seed = SSLDataset(store, dataset.augmentation, base_seed=6)[key]
    assert not torch.equal(sample["global_crops"], other_seed["global_crops"])


def _recover_orientation(crop: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(axis order, flipped output axes) of a crop of the ramp volume, from its gradients."""
    volume = crop[0].double()
    gradients = [volume.diff(dim=axis).mean().item() for axis in range(3)]
    # The source axis with the steepest slope shows the steepest gradient, whatever the zoom.
    by_steepness = np.argsort(np.abs(gradients))
    axis_order = [0, 0, 0]
    for source_axis, output_axis in enumerate(by_steepness):
        axis_order[output_axis] = source_axis
    flipped = tuple(axis for axis in range(3) if gradients[axis] < 0)
    return tuple(axis_order), flipped


def test_axis_permutation_and_flips_happen_at_their_probabilities(store):
    settings = MultiCropSettings(
        global_crop_size=8,
        local_crop_size=8,
        n_local_crops=40,
        local_crop_scale=(0.3, 0.6),  # regions of 7-14 voxels: gradients always visible
        global_crop_scale=(0.3, 0.6),
        axis_permutation_probability=0.5,
        global_flip_probability=0.7,
        local_flip_probability=0.2,
        global_window_probability=(0.0, 0.0),
    )
    augmentation = MultiCropAugmentation(settings)
    n_permuted, n_flipped, n_local = 0, np.zeros(3), 0
    for seed in range(12):
        crops = augmentation(store, "ramp", np.random.default_rng(seed))
        plan = augmentation.plan(RAMP_SHAPE, np.random.default_rng(seed))
        rendered = [*crops["global_crops"], *crops["local_crops"]]
        for crop, crop_plan in zip(rendered, (*plan.global_crops, *plan.local_crops)):
            assert _recover_orientation(crop) == (crop_plan.axis_order, crop_plan.flip_axes)
        for crop in crops["local_crops"]:
            axis_order, flipped = _recover_orientation(crop)
            n_permuted += axis_order != (0, 1, 2)
            n_flipped[list(flipped)] += 1
            n_local += 1

    # 480 draws: 4 binomial standard deviations are below 0.1.
    assert n_permuted / n_local == pytest.approx(0.5, abs=0.1)
    assert n_flipped / n_local == pytest.approx([0.2, 0.2, 0.2], abs=0.08)


def test_window_clips_to_a_narrower_hu_range_inside_the_clip_range(store):
    settings = MultiCropSettings(
        global_crop_size=16, n_local_crops=0, global_window_probability=(1.0, 0.0)
    )
    augmentation = MultiCropAugmentation(settings)
    low, high = settings.hu_clip
    for seed in range(5):
        plan = augmentation.plan(store.shape("noise_b"), np.random.default_rng(seed))
        windowed_plan = plan.global_crops[0]
        assert windowed_plan.window is not None and plan.global_crops[1].window is None

        windowed = as_hu(augmentation.render(store, "noise_b", windowed_plan), settings)
        plain_plan = dataclasses.replace(windowed_plan, window=None)
        plain = as_hu(augmentation.render(store, "noise_b", plain_plan), settings)

        tolerance = 1e-3
        assert low - tolerance <= plain.min() and plain.max() <= high + tolerance
        window_low, window_high = windowed.min().item(), windowed.max().item()
        assert window_high - window_low >= settings.min_window_width - tolerance
        assert window_high - window_low < plain.max().item() - plain.min().item()
        assert torch.allclose(windowed, plain.clamp(window_low, window_high), atol=tolerance)


def test_standardisation_and_noise(store):
    settings = MultiCropSettings(
        **SMALL, normalisation_mean=100.0, normalisation_std=50.0, global_window_probability=(0, 0)
    )
    clean = MultiCropAugmentation(settings)(store, "constant", np.random.default_rng(0))
    expected = (CONSTANT_HU - 100.0) / 50.0
    assert torch.allclose(clean["global_crops"], torch.full_like(clean["global_crops"], expected))

    noisy_settings = dataclasses.replace(settings, global_crop_size=16, noise_std=20.0)
    noisy = MultiCropAugmentation(noisy_settings)(store, "constant", np.random.default_rng(0))
    assert noisy["global_crops"].mean().item() == pytest.approx(expected, abs=0.05)
    assert noisy["global_crops"].std().item() == pytest.approx(20.0 / 50.0, rel=0.1)


def test_regions_larger_than_a_small_volume_are_padded_with_air(store, monkeypatch):
    settings = MultiCropSettings(**SMALL, reference_extent=16, global_window_probability=(0, 0))
    augmentation = MultiCropAugmentation(settings)
    reads = record_reads(store, monkeypatch)

    crops = augmentation(store, "tiny", np.random.default_rng(1))

    assert crops["global_crops"].shape == (2, 1, 8, 8, 8)
    # Too long along an axis: the region covers the whole axis, overhanging on both sides.
    for start, size, _ in reads:
        for s, n, dim in zip(start, size, TINY_SHAPE):
            if n > dim:
                assert s <= 0 and s + n >= dim
    overhangs = [
        (s, n, dim)
        for start, size, _ in reads
        for s, n, dim in zip(start, size, TINY_SHAPE)
        if n > dim
    ]
    assert any(s < 0 for s, _, _ in overhangs) and any(s + n > dim for s, n, dim in overhangs)
    air = (settings.hu_clip[0] - settings.normalisation_mean) / settings.normalisation_std
    tissue = (TINY_HU - settings.normalisation_mean) / settings.normalisation_std
    assert crops["global_crops"].min().item() == pytest.approx(air)
    assert crops["global_crops"].max().item() == pytest.approx(tissue)

    # With the reference's shortest-side scale the small scan is upsampled, never padded.
    unpadded = MultiCropAugmentation(MultiCropSettings(**SMALL))(
        store, "tiny", np.random.default_rng(1)
    )
    assert unpadded["global_crops"].min().item() == pytest.approx(tissue)


# --- sampler -------------------------------------------------------------------------------


def _take(iterable, n):
    iterator = iter(iterable)
    return [next(iterator) for _ in range(n)]


def test_ranks_split_every_epoch_into_disjoint_parts():
    n_scans, world_size, n_epochs = 10, 3, 3
    per_rank = n_scans * n_epochs // world_size
    seen = {}  # epoch -> scan indices seen by any rank
    for rank in range(world_size):
        sampler = InfiniteShardedSampler(n_scans, seed=1, rank=rank, world_size=world_size)
        for key in _take(sampler, per_rank):
            epoch, scan_index = decode_sample_key(key, n_scans)
            seen.setdefault(epoch, []).append(scan_index)

    assert sorted(seen) == list(range(n_epochs))
    for indices in seen.values():
        assert sorted(indices) == list(range(n_scans))  # disjoint and covering
    stream = _take(InfiniteShardedSampler(n_scans, seed=1), 2 * n_scans)
    order = [decode_sample_key(key, n_scans)[1] for key in stream]
    assert order[:n_scans] != order[n_scans:]  # a fresh permutation per epoch


def test_sampler_resumes_exactly_at_start_sample():
    uninterrupted = _take(InfiniteShardedSampler(7, seed=2, rank=1, world_size=2), 30)
    resumed = InfiniteShardedSampler(7, seed=2, rank=1, world_size=2, start_sample=13)
    assert _take(resumed, 17) == uninterrupted[13:]

    restored = InfiniteShardedSampler(7, seed=2, rank=1, world_size=2)
    restored.load_state_dict(resumed.state_dict())
    assert _take(restored, 17) == uninterrupted[13:]
    with pytest.raises(VoxelFMError, match="world_size"):
        InfiniteShardedSampler(7, seed=2, rank=0, world_size=4).load_state_dict(
            resumed.state_dict()
        )


# --- collate and loader --------------------------------------------------------------------


def _fake_sample(b: int, n_local: int, global_size: int = 16, local_size: int = 8) -> dict:
    """Crops filled with 10 * sample + view, so the batch order can be read back."""
    views = torch.arange(2 + n_local, dtype=torch.float32) + 10 * b
    return {
        "global_crops": views[:2].view(2, 1, 1, 1, 1).expand(2, 1, *(global_size,) * 3).clone(),
        "local_crops": views[2:]
        .view(n_local, 1, 1, 1, 1)
        .expand(n_local, 1, *(local_size,) * 3)
        .clone(),
        "scan_id": f"scan{b}",
        "sample_key": b,
    }


def test_collate_orders_views_and_masks_like_dinov2():
    batch_size, n_local, grid = 3, 4, (4, 4, 4)
    samples = [_fake_sample(b, n_local) for b in range(batch_size)]
    generator = BlockMaskGenerator3D(grid)
    collate = {"mask_generator": generator, "mask_probability": 0.5, "mask_ratio_range": (0.1, 0.5)}

    batch = collate_ssl_batch(samples, **collate, rng=np.random.default_rng(0))

    assert batch["global_crops"].shape == (2 * batch_size, 1, 16, 16, 16)
    assert batch["local_crops"].shape == (n_local * batch_size, 1, 8, 8, 8)
    global_tags = batch["global_crops"][:, 0, 0, 0, 0].tolist()
    assert global_tags == [10 * b + v for v in range(2) for b in range(batch_size)]
    local_tags = batch["local_crops"][:, 0, 0, 0, 0].tolist()
    assert local_tags == [10 * b + 2 + v for v in range(n_local) for b in range(batch_size)]

    masks = batch["masks"]
    n_patches = math.prod(grid)
    assert masks.shape == (2 * batch_size, n_patches) and masks.dtype == torch.bool
    masked_per_crop = masks.sum(dim=1)
    assert int((masked_per_crop > 0).sum()) == int(2 * batch_size * 0.5)
    ratios = masked_per_crop[masked_per_crop > 0] / n_patches
    assert ((ratios >= math.floor(0.1 * n_patches) / n_patches) & (ratios <= 0.5)).all()
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    assert batch["n_masked_patches"].item() == batch["mask_indices"].numel()
    assert batch["masks_weight"].sum().item() == pytest.approx(int(2 * batch_size * 0.5))

    again = collate_ssl_batch(samples, **collate, rng=np.random.default_rng(0))
    other = collate_ssl_batch(samples, **collate, rng=np.random.default_rng(1))
    assert torch.equal(again["masks"], masks) and not torch.equal(other["masks"], masks)


def _loader(store, num_workers, start_iteration=0):
    return build_ssl_dataloader(
        store,
        MultiCropSettings(**SMALL),
        batch_size_per_rank=2,
        num_workers=num_workers,
        base_seed=11,
        patch_size=4,
        start_iteration=start_iteration,
    )


def _assert_same_batch(a: dict, b: dict) -> None:
    assert a["scan_ids"] == b["scan_ids"]
    for key in ("global_crops", "local_crops", "masks", "mask_indices", "sample_keys"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restarted_loader_continues_the_uninterrupted_stream(store, num_workers):
    k = 3  # crosses an epoch boundary: 5 scans, 2 per batch
    uninterrupted_loader = _loader(store, num_workers)
    uninterrupted = _take(uninterrupted_loader, k + 1)
    checkpoint = uninterrupted_loader.state_dict()
    assert checkpoint["start_sample"] == (k + 1) * 2
    del uninterrupted_loader

    _assert_same_batch(
        _take(_loader(store, num_workers, start_iteration=k), 1)[0], uninterrupted[k]
    )
    restored = _loader(store, num_workers)
    restored.load_state_dict({**checkpoint, "start_sample": k * 2})
    _assert_same_batch(_take(restored, 1)[0], uninterrupted[k])


def test_batches_do_not_depend_on_the_number_of_workers(store):
    for single, parallel in zip(_take(_loader(store, 0), 3), _take(_loader(store, 2), 3)):
        _assert_same_batch(single, parallel)


# --- configuration -------------------------------------------------------------------------


def test_settings_from_config_and_validation(store):
    recipe = {
        "global_crops_size": 112,
        "local_crops_size": 56,
        "local_crops_number": 8,
        "global_crops_scale": [0.32, 1.0],
        "local_crops_scale": [0.05, 0.32],
    }
    assert MultiCropSettings.from_config(recipe) == MultiCropSettings()
    # The defaults are the package recipe's values (the YAML is the source; these mirror it).
    assert MultiCropSettings.from_config(resolve_ssl_config()["crops"]) == MultiCropSettings()
    with pytest.raises(VoxelFMError, match="crops.local_crop_number.*local_crops_number"):
        MultiCropSettings.from_config({"local_crop_number": 8})
    with pytest.raises(VoxelFMError, match="'crops.global_crops_scale' must be"):
        MultiCropSettings(global_crop_scale=(0.5, 0.2))
    with pytest.raises(VoxelFMError, match="'crops.aspect_ratio_range' must be"):
        MultiCropSettings(aspect_ratio_range=(1.5, 2.0))
    with pytest.raises(VoxelFMError, match="'crops.global_crops_size' must be an integer"):
        MultiCropSettings.from_config({"global_crops_size": "112"})
    with pytest.raises(VoxelFMError, match="'crops.hu_clip' must be a pair"):
        MultiCropSettings(hu_clip=(-1000.0,))
    with pytest.raises(VoxelFMError, match="'crops.noise_std' must be a number"):
        MultiCropSettings(noise_std=None)
    with pytest.raises(ValueError, match="patch_size"):
        build_ssl_dataloader(
            store,
            MultiCropSettings(**SMALL),
            batch_size_per_rank=2,
            num_workers=0,
            base_seed=0,
            patch_size=3,
        )
