"""Pretraining data: an endless, resumable, rank-sharded stream of multi-crop batches.

Determinism contract. The data a rank sees at its k-th sample is a pure function of
(base_seed, world_size, rank, k), whatever the number of DataLoader workers and however
often the run was restarted:

- the global sample stream visits the scans in a fresh permutation per epoch, epoch ``e``'s
  drawn from ``SeedSequence([base_seed, e])`` (permutation stream);
- rank ``r`` takes stream positions ``r, r + W, r + 2W, ...``, so the ranks split every
  epoch into disjoint parts and a rank's k-th sample sits at position ``k * W + r``;
- a sample is addressed by a *sample key* ``epoch * n_scans + scan_index``; its crops come
  from ``SeedSequence([base_seed, epoch, scan_index])``, its batch's iBOT masks from the
  keys of the whole batch (mask stream).

Resuming at optimiser step ``s`` is then just starting the rank at sample
``s * batches_per_step * batch_size``; no worker or RNG state needs saving.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from voxelfm.errors import VoxelFMError
from voxelfm.ssl.masking import BlockMaskGenerator3D, sample_batch_masks
from voxelfm.ssl.multicrop import CropSource, MultiCropAugmentation, MultiCropSettings

# spawn_key values keeping the permutation and mask streams apart from the crop stream.
_PERMUTATION_STREAM = 1
_MASK_STREAM = 2


def encode_sample_key(epoch: int, scan_index: int, n_scans: int) -> int:
    return epoch * n_scans + scan_index


def decode_sample_key(key: int, n_scans: int) -> tuple[int, int]:
    """(epoch, scan_index) of a sample key."""
    return divmod(int(key), n_scans)


def crop_rng(base_seed: int, epoch: int, scan_index: int) -> np.random.Generator:
    """The generator of all crop randomness of scan ``scan_index`` in ``epoch``."""
    return np.random.default_rng(np.random.SeedSequence([base_seed, epoch, scan_index]))


def epoch_permutation(base_seed: int, epoch: int, n_scans: int) -> np.ndarray:
    """The order in which ``epoch`` visits the scans, (n_scans,) int64."""
    seed = np.random.SeedSequence([base_seed, epoch], spawn_key=(_PERMUTATION_STREAM,))
    return np.random.default_rng(seed).permutation(n_scans)


def mask_rng(base_seed: int, sample_keys: Sequence[int]) -> np.random.Generator:
    """The generator of a batch's iBOT masks, fixed by the samples in the batch."""
    seed = np.random.SeedSequence([base_seed, *map(int, sample_keys)], spawn_key=(_MASK_STREAM,))
    return np.random.default_rng(seed)


class SSLDataset(Dataset):
    """Multi-crop views of the scans of a store, addressed by sample key (see module doc).

    ``dataset[key]`` returns ``global_crops`` (2, 1, G, G, G), ``local_crops``
    (N, 1, L, L, L), ``scan_id`` and ``sample_key``. Keys below ``len(dataset)`` are the
    scans themselves in epoch 0.
    """

    def __init__(self, store: CropSource, augmentation: MultiCropAugmentation, base_seed: int):
        self.store = store
        self.augmentation = augmentation
        self.base_seed = int(base_seed)
        self.scan_ids: list[str] = list(store.scan_ids)  # type: ignore[attr-defined]
        if not self.scan_ids:
            raise VoxelFMError(f"no scans to pretrain on in {store!r}")

    def __len__(self) -> int:
        return len(self.scan_ids)

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, scan_index = decode_sample_key(key, len(self))
        scan_id = self.scan_ids[scan_index]
        crops = self.augmentation(self.store, scan_id, crop_rng(self.base_seed, epoch, scan_index))
        return {**crops, "scan_id": scan_id, "sample_key": int(key)}


class InfiniteShardedSampler(Sampler[int]):
    """Sample keys forever: per-epoch permutations of the scans, sharded over ranks.

    Args:
        n_scans: scans in the dataset.
        seed: base seed of the run.
        rank, world_size: this process's shard; rank r yields stream positions r mod W.
        start_sample: samples this rank has already consumed; iteration resumes there.
    """

    def __init__(
        self, n_scans: int, *, seed: int, rank: int = 0, world_size: int = 1, start_sample: int = 0
    ):
        if n_scans < 1:
            raise ValueError("n_scans must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if start_sample < 0:
            raise ValueError("start_sample must be >= 0")
        self.n_scans = int(n_scans)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_sample = int(start_sample)

    def __iter__(self) -> Iterator[int]:
        position = self.start_sample * self.world_size + self.rank  # in the global stream
        epoch, permutation = -1, np.empty(0, dtype=np.int64)
        while True:
            position_epoch, offset = divmod(position, self.n_scans)
            if position_epoch != epoch:
                epoch = position_epoch
                permutation = epoch_permutation(self.seed, epoch, self.n_scans)
            yield encode_sample_key(epoch, int(permutation[offset]), self.n_scans)
            position += self.world_size

    def state_dict(self) -> dict[str, int]:
        """Where iteration starts. The sampler cannot know how far the training loop has
        consumed (workers prefetch ahead): checkpoint :meth:`SSLDataLoader.state_dict`."""
        return {
            "seed": self.seed,
            "n_scans": self.n_scans,
            "world_size": self.world_size,
            "rank": self.rank,
            "start_sample": self.start_sample,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state['start_sample']``; the stream itself must be unchanged."""
        for name in ("seed", "n_scans", "world_size"):
            if int(state[name]) != getattr(self, name):
                raise VoxelFMError(
                    f"cannot resume the data stream: checkpoint has {name}={state[name]}, "
                    f"this run has {getattr(self, name)}"
                )
        self.start_sample = int(state["start_sample"])


@dataclass(frozen=True)
class IBOTMaskingSettings:
    """iBOT masking of the global crops. A training recipe sets the first two from its
    ``ibot`` section (``voxelfm.train.settings.IBOTSettings.masking``) and has no keys for
    the last two; the defaults are the VoxelFM reference values."""

    mask_probability: float = 0.5  # fraction of global crops that are masked
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)  # patches masked in a masked crop
    min_block_patches: int = 4
    min_aspect: float = 0.3


def collate_ssl_batch(
    samples: Sequence[dict[str, Any]],
    *,
    mask_generator: BlockMaskGenerator3D,
    mask_probability: float,
    mask_ratio_range: tuple[float, float],
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Stack B samples into one batch with iBOT masks (dinov2's ``collate_data_and_cast``).

    Returns:
        global_crops: (2B, 1, G, G, G), view-major: view 0 of every sample, then view 1.
        local_crops: (N*B, 1, L, L, L), view-major likewise.
        masks: (2B, n_patches) bool, True = patch replaced by the mask token; patches in
            the row-major (x, y, z) token order of the patch embedding.
        mask_indices: (M,) int64 positions of the masked patches in ``masks.flatten()``.
        masks_weight: (M,) float32, 1 / (masked patches of its crop), per masked patch.
        n_masked_patches: (1,) int64, M.
        scan_ids: B scan ids; sample_keys: (B,) int64.
    dinov2's ``upperbound`` (its fixed-size buffer bound) is not produced: the VoxelFM
    losses index masked tokens with ``masks`` directly.
    """
    global_crops = torch.stack([s["global_crops"] for s in samples], dim=1)  # (2, B, 1, G, G, G)
    local_crops = torch.stack([s["local_crops"] for s in samples], dim=1)  # (N, B, 1, L, L, L)
    global_crops = global_crops.flatten(0, 1)  # (2B, 1, G, G, G)
    grid = mask_generator.grid_size
    crop_shape = tuple(global_crops.shape[-3:])
    patch_size = crop_shape[0] // grid[0]
    if crop_shape != tuple(cells * patch_size for cells in grid):
        raise ValueError(f"mask grid {grid} does not tile global crops of shape {crop_shape}")

    masks = sample_batch_masks(
        global_crops.shape[0], mask_generator, mask_probability, tuple(mask_ratio_range), rng
    )  # (2B, n_patches)
    masked_per_crop = masks.sum(dim=1)  # (2B,)
    mask_indices = masks.flatten().nonzero().flatten()  # (M,)
    masks_weight = (1.0 / masked_per_crop.clamp(min=1).float()).repeat_interleave(masked_per_crop)
    return {
        "global_crops": global_crops,
        "local_crops": local_crops.flatten(0, 1),  # (N*B, 1, L, L, L)
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([mask_indices.numel()], dtype=torch.long),
        "scan_ids": [s["scan_id"] for s in samples],
        "sample_keys": torch.tensor([s["sample_key"] for s in samples], dtype=torch.long),
    }


class SSLCollate:
    """Picklable collate function: masks seeded by the batch's sample keys."""

    def __init__(
        self, base_seed: int, mask_generator: BlockMaskGenerator3D, masking: IBOTMaskingSettings
    ):
        self.base_seed = base_seed
        self.mask_generator = mask_generator
        self.masking = masking

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_ssl_batch(
            samples,
            mask_generator=self.mask_generator,
            mask_probability=self.masking.mask_probability,
            mask_ratio_range=self.masking.mask_ratio_range,
            rng=mask_rng(self.base_seed, [s["sample_key"] for s in samples]),
        )


class SSLDataLoader(DataLoader):
    """A DataLoader over an :class:`InfiniteShardedSampler` that counts the batches it has
    handed to the training loop, so :meth:`state_dict` is exact despite worker prefetch.

    A new ``iter()`` continues after the last delivered batch (prefetched ones are redone).
    """

    sampler: InfiniteShardedSampler

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, InfiniteShardedSampler):
            raise TypeError("SSLDataLoader needs an InfiniteShardedSampler")
        self.next_sample = self.sampler.start_sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.sampler.start_sample = self.next_sample
        for batch in super().__iter__():
            self.next_sample += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Checkpoint this: the stream identity and the next sample the loop will get."""
        return {**self.sampler.state_dict(), "start_sample": self.next_sample}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict` (before iterating)."""
        self.sampler.load_state_dict(state)
        self.next_sample = self.sampler.start_sample


def build_ssl_dataloader(
    store: CropSource,
    crops: MultiCropSettings,
    *,
    batch_size_per_rank: int,
    num_workers: int,
    base_seed: int,
    patch_size: int,
    masking: IBOTMaskingSettings = IBOTMaskingSettings(),
    start_iteration: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> SSLDataLoader:
    """The endless batch stream of one rank (batches as :func:`collate_ssl_batch`).

    ``start_iteration``: batches this rank has already consumed (optimiser steps times
    gradient-accumulation micro-batches); the loader resumes exactly after them.
    """
    if crops.global_crop_size % patch_size:
        raise ValueError(
            f"global_crop_size {crops.global_crop_size} is not a multiple of "
            f"patch_size {patch_size}"
        )
    cells = crops.global_crop_size // patch_size
    mask_generator = BlockMaskGenerator3D(
        (cells, cells, cells),
        min_block_patches=masking.min_block_patches,
        min_aspect=masking.min_aspect,
    )
    dataset = SSLDataset(store, MultiCropAugmentation(crops), base_seed)
    sampler = InfiniteShardedSampler(
        len(dataset),
        seed=base_seed,
        rank=rank,
        world_size=world_size,
        start_sample=start_iteration * batch_size_per_rank,
    )
    return SSLDataLoader(
        dataset,
        batch_size=batch_size_per_rank,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=SSLCollate(base_seed, mask_generator, masking),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_single_threaded_worker if num_workers > 0 else None,
    )


def _single_threaded_worker(worker_id: int) -> None:
    # Each worker interpolates its own crops; intra-op threads would oversubscribe the CPUs.
    torch.set_num_threads(1)
