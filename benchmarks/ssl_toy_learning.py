"""Does self-distillation learn a cross-view identity at CI scale? A toy diagnostic (issue 13).

Generated volumes: each belongs to one of 13 identities, a striped texture whose orientation
is the identity (the 3 axes, 6 face and 4 body diagonals), under smooth random "anatomy"
blobs that differ between volumes. Two crops of a volume share the identity and little
else. The script trains the tiny preset through the production path
(``build_ssl_dataloader`` and ``Pretrainer.train_step``) for a few hundred steps, logs the
DINO loss against log K, the teacher's mean per-sample entropy against the entropy of its
batch-mean target (equal entropies mean the teacher's targets no longer depend on the
sample: the flattening collapse), and finally the 1-NN identity accuracy of held-out crops
on the teacher's CLS against the same network at its initial weights (the baseline,
measured in the same run).

Meant to become ``tests/test_ssl_learning.py`` once a recipe passes: DINO loss well below
log K and teacher accuracy far above the initial one. None of the 20 recipes tried in
issue 13 did (docs/pretraining.md); ``--set`` overrides recipe keys or the module's data
constants to try more:

    python benchmarks/ssl_toy_learning.py
    python benchmarks/ssl_toy_learning.py --set '{"BASE_HU": -574, "schedules.lr": {"peak": 3e-3}}'
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from voxelfm.ssl.data import build_ssl_dataloader
from voxelfm.ssl.multicrop import MultiCropAugmentation, MultiCropSettings
from voxelfm.train.config import resolve_ssl_config
from voxelfm.train.trainer import DistributedContext, Pretrainer

TRAIN_VOLUMES_PER_IDENTITY = 2
HELD_OUT_VOLUMES_PER_IDENTITY = 2
CROPS_PER_HELD_OUT_VOLUME = 4
EDGE = 40  # voxels per side of a generated volume
N_PROTOTYPES = 32
STEPS = 600
NUISANCE_HU = 150.0  # amplitude of the per-volume blobs
STRIPE_HU = 300.0  # amplitude of the identity texture
# The recipe standardises HU with mean -573.8: a base near it gives zero-mean crops, so at
# initialisation crops do not all fall on one prototype (a -200 HU base does).
BASE_HU = -574.0
CPU = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"))

# One identity per stripe orientation: the 3 axes, the 6 face diagonals and the 4 body
# diagonals (crops are not flipped, so every orientation stays distinct).
STRIPE_DIRECTIONS = (
    (1, 0, 0), (0, 1, 0), (0, 0, 1),
    (1, 1, 0), (1, -1, 0), (1, 0, 1), (1, 0, -1), (0, 1, 1), (0, 1, -1),
    (1, 1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1),
)  # fmt: skip
WAVELENGTH = 6.0  # voxels
N_IDENTITIES = len(STRIPE_DIRECTIONS)

RECIPE = {
    "model": {"preset": "tiny", "drop_path_rate": 0.0, "overrides": {"layerscale_init": 1.0}},
    "dino": {
        "head_n_prototypes": N_PROTOTYPES,
        "head_hidden_dim": 128,
        "head_bottleneck_dim": 8,
        "koleo_loss_weight": 0.1,
    },
    "ibot": {"head_n_prototypes": N_PROTOTYPES, "head_hidden_dim": 128, "head_bottleneck_dim": 8},
    "crops": {
        "global_crops_size": 16,
        "local_crops_size": 8,
        "local_crops_number": 2,
        "global_crops_scale": [0.5, 0.8],
        "local_crops_scale": [0.3, 0.5],
        "axis_permutation_probability": 0.0,
        "global_flip_probability": 0.0,
        "global_window_probability": [0.0, 0.0],
    },
    "train": {
        "batch_size_per_gpu": 8,
        "total_batch_size": 8,
        "epochs": 4,
        "official_epoch_length": STEPS // 4,
        "num_workers": 0,
        "compute_precision": "fp32",
        "seed": 0,
    },
    "schedules": {
        "lr": {"peak": 1e-3, "warmup_epochs": 0.5, "freeze_last_layer_epochs": 0.25},
        "teacher_temp": {"start": 0.03, "peak": 0.03, "warmup_epochs": 0},
        "momentum": {"start": 0.99, "end": 0.99},
    },
    "checkpointing": {"period_iterations": 10_000},
    "monitoring": {"log_period_iterations": 20},
}


def smooth_blobs(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Large random blobs in [-1, 1]: white noise low-passed in Fourier space."""
    noise = rng.standard_normal(shape)
    freqs = np.meshgrid(*(np.fft.fftfreq(n) for n in shape), indexing="ij")
    radius2 = sum(f**2 for f in freqs)
    smooth = np.fft.ifftn(np.fft.fftn(noise) * np.exp(-radius2 / (2 * 0.04**2))).real
    return smooth / np.abs(smooth).max()


def identity_volume(identity: int, seed: int) -> np.ndarray:
    """(EDGE,)*3 int16 HU: the identity's stripes (random phase) over a per-volume nuisance."""
    rng = np.random.default_rng([identity, seed])
    unit = np.asarray(STRIPE_DIRECTIONS[identity], float)
    unit /= np.linalg.norm(unit)
    grid = np.stack(np.meshgrid(*(np.arange(EDGE),) * 3, indexing="ij"), axis=-1)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * (grid @ unit) / WAVELENGTH + phase)
    hu = BASE_HU + NUISANCE_HU * smooth_blobs(rng, (EDGE,) * 3) + STRIPE_HU * stripes
    return np.rint(hu).astype(np.int16)


class InMemoryVolumes:
    """The ``CropSource`` the SSL data loader reads, over arrays held in memory."""

    def __init__(self, volumes: dict[str, np.ndarray]):
        self.volumes = volumes
        self.scan_ids = list(volumes)

    def shape(self, scan_id: str) -> tuple[int, int, int]:
        return self.volumes[scan_id].shape

    def read_crop(self, scan_id, start, size) -> np.ndarray:
        box = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
        return self.volumes[scan_id][box]


def training_store() -> InMemoryVolumes:
    return InMemoryVolumes(
        {
            f"id{identity}_v{v}": identity_volume(identity, seed=v)
            for identity in range(N_IDENTITIES)
            for v in range(TRAIN_VOLUMES_PER_IDENTITY)
        }
    )


def held_out_crops(crops: MultiCropSettings) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Global crops of volumes never trained on: (N, 1, G, G, G), identities, volume ids."""
    augmentation = MultiCropAugmentation(crops)
    crops, identities, volumes = [], [], []
    for identity in range(N_IDENTITIES):
        for v in range(HELD_OUT_VOLUMES_PER_IDENTITY):
            seed = 1000 + v
            store = InMemoryVolumes({"scan": identity_volume(identity, seed=seed)})
            rng = np.random.default_rng([identity, seed, 7])
            for _ in range(CROPS_PER_HELD_OUT_VOLUME // 2):
                crops.append(augmentation(store, "scan", rng)["global_crops"])
                identities += [identity, identity]
                volumes += [identity * 100 + v] * 2
    return torch.cat(crops), np.asarray(identities), np.asarray(volumes)


def instance_crops(crops: MultiCropSettings) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """New global crops (unseen draws) of the training volumes, labelled by volume: the
    instance task that two crops of one volume teach. Returns crops, volume labels and a
    per-crop id (a crop is never its own neighbour)."""
    augmentation = MultiCropAugmentation(crops)
    store = training_store()
    crops, labels = [], []
    for index, scan_id in enumerate(store.scan_ids):
        rng = np.random.default_rng([index, 99])
        for _ in range(CROPS_PER_HELD_OUT_VOLUME // 2):
            crops.append(augmentation(store, scan_id, rng)["global_crops"])
            labels += [index, index]
    return torch.cat(crops), np.asarray(labels), np.arange(len(labels))


@torch.no_grad()
def nearest_neighbour_accuracy(backbone, crops, identities, volumes) -> float:
    """1-NN identity accuracy on cosine similarity of CLS; neighbours from other volumes only."""
    backbone.eval()
    cls = torch.nn.functional.normalize(backbone(crops).x_norm_clstoken, dim=-1)
    similarity = cls @ cls.T
    same_volume = torch.as_tensor(volumes[:, None] == volumes[None, :])
    similarity[same_volume] = -math.inf
    nearest = similarity.argmax(dim=1).numpy()
    return float((identities[nearest] == identities).mean())


def train_and_probe(work_dir, recipe=RECIPE, log_every: int = 20):
    """Train; returns (DINO losses, {task: (teacher, initial) 1-NN accuracy}) and prints the
    loss and the teacher's per-sample and batch-marginal entropies every ``log_every`` steps."""
    trainer = Pretrainer(resolve_ssl_config(recipe), work_dir, CPU, progress=False)
    settings = trainer.settings
    initial = copy.deepcopy(trainer.model.teacher["backbone"])
    loader = build_ssl_dataloader(
        training_store(),
        settings.crops,
        batch_size_per_rank=settings.train.batch_size_per_gpu,
        num_workers=0,
        base_seed=settings.train.seed,
        patch_size=8,
        masking=settings.ibot.masking,
    )
    batches = iter(loader)
    model_forward = trainer.model.forward
    last: dict = {}

    def recording_forward(*args, **kwargs):
        out = model_forward(*args, **kwargs)
        last["teacher_probs"] = out.teacher_probs
        return out

    trainer.model.forward = recording_forward
    losses = []
    for iteration in range(trainer.total_iterations):
        metrics = trainer.train_step([next(batches)], iteration, with_stats=False)
        losses.append(metrics["loss_dino"])
        if iteration % log_every == 0 or iteration == trainer.total_iterations - 1:
            probs = last["teacher_probs"].reshape(-1, last["teacher_probs"].shape[-1])
            per_sample = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
            mean = probs.mean(0)
            marginal = float(-(mean * mean.clamp_min(1e-12).log()).sum())
            print(
                f"step {iteration:4d}  DINO {metrics['loss_dino']:.2f}  teacher entropy "
                f"{per_sample:.2f}  of its batch mean {marginal:.2f}",
                flush=True,
            )
    accuracies = {}
    for task, make in (("texture", held_out_crops), ("instance", instance_crops)):
        crops, labels, groups = make(settings.crops)
        accuracies[task] = tuple(
            nearest_neighbour_accuracy(backbone, crops, labels, groups)
            for backbone in (trainer.model.teacher["backbone"], initial)
        )
    return np.asarray(losses), accuracies


def _apply(recipe: dict, settings: dict) -> dict:
    recipe = copy.deepcopy(recipe)
    module = sys.modules[__name__]
    for path, value in settings.items():
        if path.isupper():  # a data constant of this module
            setattr(module, path, value)
            continue
        node = recipe
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--set",
        type=json.loads,
        default={},
        help="JSON {dotted.recipe.key or DATA_CONSTANT: value}",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = _apply(RECIPE, args.set)
    with tempfile.TemporaryDirectory() as work:
        losses, accuracies = train_and_probe(Path(work), recipe)
    n_prototypes = recipe["dino"]["head_n_prototypes"]
    print(
        f"DINO loss, last 20 steps {losses[-20:].mean():.3f} (log K {math.log(n_prototypes):.3f})"
    )
    chance = {
        "texture": 1 / N_IDENTITIES,
        "instance": 1 / (N_IDENTITIES * TRAIN_VOLUMES_PER_IDENTITY),
    }
    for task, (teacher, initial) in accuracies.items():
        print(
            f"1-NN {task} accuracy: teacher {teacher:.3f}, initial {initial:.3f} "
            f"(ratio {teacher / max(initial, 1e-9):.2f}; chance {chance[task]:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
