"""Training throughput of the SSL step: samples/s, tokens/s and model FLOP utilisation.

One *step* is exactly what :meth:`voxelfm.train.trainer.Pretrainer.train_step` does per
optimiser step (one micro-batch, no gradient accumulation): teacher forward on the global
crops, student forward on all crops (iBOT-masked globals + locals), DINO + iBOT + KoLeo
losses, backward, per-module gradient clipping, AdamW step, teacher EMA update and loss
centre updates. The monitoring statistics (an SVD every ``log_period`` steps) are off.
Batches are synthetic random crops built in memory with the real collate function
(:func:`voxelfm.ssl.data.collate_ssl_batch`, block masks included) and already on the
device, so **data loading and host-to-device copies are excluded**: this is the compute
ceiling that the data pipeline has to keep fed.

Definitions
    sample    one multi-crop set: 2 global + n_local local crops of one scan.
    tokens/s  student tokens processed per second: every crop's patch tokens plus its
              CLS and register tokens (the teacher's forward on the global crops is not
              counted). Per sample: 2 * (1 + R + (G/p)^3) + n_local * (1 + R + (L/p)^3).
    MFU       model FLOP utilisation = model FLOPs per step (below) / step time / the
              device's peak dense bf16 FLOP/s (H100 SXM and H200: 989 TFLOP/s). The fp32
              rows are divided by the same bf16 peak, so the column compares like with like.
    peak mem  CUDA only: ``torch.cuda.max_memory_allocated`` over the variant's steps
              (weights, optimiser state, batches and activations; variants run one at a
              time on CUDA, so it is the variant's own).

Model FLOPs per step (multiply-add = 2 FLOPs; matmuls and the patch convolution only --
norms, softmax, GELU, RoPE, losses and the optimiser are not counted), for a backbone of
width D, depth L, MLP width H, patch p, R registers, and a head with MLP widths
(D, h, ..., b) and K prototypes::

    fwd(n, N)  = n * [2 N p^3 D  +  L * (2 T D (4 D + 2 H)  +  4 T^2 D)],   T = 1 + R + N
                 (n sequences of N patches: patch embedding; qkv + proj + MLP; q k^T and a v)
    head(r)    = r * 2 * (D h + h h + ... + h b + b K)            (r rows through a head)
    student    = 3 * [fwd(2B, Ng) + fwd(nl B, Nl) + head(2B + nl B) + head(M)]
                 - 2B Ng 2 p^3 D - nl B Nl 2 p^3 D                (no input grad of the
                                                                  patch convolution)
    teacher    = fwd(2B, Ng) + head(2B) + head(M)
    KoLeo      = 2 * 2 B^2 D                                     (nearest-neighbour search)
    total      = student + teacher + KoLeo

with B samples, Ng = (G/p)^3 and Nl = (L/p)^3 patches per global / local crop and M the
iBOT-masked patches of the batch (counted from the synthetic masks). Backward = 2x
forward (input and weight gradients). ``--check-flops`` compares this with
``torch.utils.flop_counter.FlopCounterMode`` on one real step of a small model (eager
attention, whose matmuls the counter sees on every device).

Variants are named ``<precision>-<attention>[-compile][-tf32]``: precision fp32 | bf16
(autocast, fp32 master weights, as ``train.compute_precision``), attention eager
(explicit softmax(q k^T) v) | sdpa (``F.scaled_dot_product_attention``, flash on GPU in
bf16), ``compile`` = ``nn.Module.compile()`` of the student and teacher backbones,
``tf32`` = TF32 matmuls and convolutions on CUDA (off otherwise: strict fp32). The first
variant is the baseline; every other one is reported as a ratio against it.

    python benchmarks/bench_training.py                    # CPU: tiny preset, demo crops
    python benchmarks/bench_training.py --device cuda      # GPU: base preset, paper crops
    python benchmarks/bench_training.py --device cuda --compile --batch-size 32
    python benchmarks/bench_training.py --check-flops      # formula vs FlopCounterMode
    python benchmarks/bench_training.py --quick            # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from voxelfm.ssl.data import collate_ssl_batch
from voxelfm.ssl.masking import BlockMaskGenerator3D
from voxelfm.train.config import merge_overrides, resolve_ssl_config
from voxelfm.train.settings import SSLSettings
from voxelfm.train.trainer import DistributedContext, Pretrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "config" / "config.yaml"

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s by device-name substring, first match.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)
TARGET_SPEEDUP = 2.0
TARGET_MFU = 0.35
CPU_VARIANTS = ("fp32-eager", "fp32-sdpa", "bf16-sdpa")
GPU_VARIANTS = ("fp32-eager", "bf16-sdpa")


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str  # fp32 | bf16
    attention: str  # eager | sdpa
    compile: bool = False
    tf32: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        parts = name.split("-")
        if len(parts) < 2 or parts[0] not in ("fp32", "bf16") or parts[1] not in ("eager", "sdpa"):
            raise ValueError(f"variant {name!r} is not <fp32|bf16>-<eager|sdpa>[-compile][-tf32]")
        unknown = set(parts[2:]) - {"compile", "tf32"}
        if unknown:
            raise ValueError(f"variant {name!r}: unknown flags {sorted(unknown)}")
        return cls(name, parts[0], parts[1], "compile" in parts[2:], "tf32" in parts[2:])


@dataclass
class Result:
    variant: Variant
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_gb: float | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        """Median seconds per step over the timed rounds."""
        return statistics.median(self.step_seconds)


# --- configuration and synthetic batches ---------------------------------------------


def recipe_overrides(recipe: str) -> dict[str, Any]:
    """``demo``: the tiny CPU demo of config/config.yaml (``pretrain.ssl``); ``paper``: the
    package defaults (ViT-B, 2 x 112^3 + 8 x 56^3 crops, 65,536 prototypes, batch 16)."""
    if recipe == "paper":
        return {}
    if recipe == "demo":
        return copy.deepcopy(yaml.safe_load(DEMO_CONFIG.read_text())["pretrain"]["ssl"])
    raise ValueError(f"unknown recipe {recipe!r}")


def bench_config(
    base_overrides: Mapping[str, Any],
    variant: Variant,
    *,
    preset: str | None,
    batch_size: int | None,
) -> dict[str, Any]:
    """A resolved SSL config for one variant: the recipe, one micro-batch per step."""
    config = resolve_ssl_config(base_overrides)
    batch = batch_size or config["train"]["batch_size_per_gpu"]
    model = {"overrides": {**config["model"]["overrides"], "attention_impl": variant.attention}}
    if preset:
        model["preset"] = preset
    return merge_overrides(
        config,
        {
            "model": model,
            "train": {
                "batch_size_per_gpu": batch,
                "total_batch_size": batch,
                "compute_precision": variant.precision,
                "num_workers": 0,
            },
        },
    )


def synthetic_batches(
    config: Mapping[str, Any], patch_size: int, n_batches: int, device: torch.device, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Random-crop micro-batches as the SSL collate function builds them (with iBOT block
    masks drawn by the recipe's masking settings), moved to ``device`` once."""
    crops = config["crops"]
    global_size, local_size = crops["global_crops_size"], crops["local_crops_size"]
    n_local = crops["local_crops_number"]
    batch_size = config["train"]["batch_size_per_gpu"]
    masking = SSLSettings.from_config(config).ibot.masking
    cells = global_size // patch_size
    mask_generator = BlockMaskGenerator3D(
        (cells,) * 3, min_block_patches=masking.min_block_patches, min_aspect=masking.min_aspect
    )
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    batches = []
    for index in range(n_batches):
        samples = [
            {
                "global_crops": torch.randn(2, 1, *(global_size,) * 3, generator=generator),
                "local_crops": torch.randn(n_local, 1, *(local_size,) * 3, generator=generator),
                "scan_id": f"synthetic-{index}-{i}",
                "sample_key": index * batch_size + i,
            }
            for i in range(batch_size)
        ]
        batch = collate_ssl_batch(
            samples,
            mask_generator=mask_generator,
            mask_probability=masking.mask_probability,
            mask_ratio_range=masking.mask_ratio_range,
            rng=rng,
        )
        batches.append(
            {key: batch[key].to(device) for key in ("global_crops", "local_crops", "masks")}
        )
    return batches


# --- analytic FLOPs and tokens -------------------------------------------------------


@dataclass(frozen=True)
class StepShape:
    """Everything the FLOP and token counts depend on."""

    embed_dim: int
    depth: int
    mlp_hidden: int
    patch_size: int
    prefix_tokens: int  # CLS + registers
    head_widths: tuple[int, ...]  # (D, h, ..., b, K) of the DINO head
    ibot_head_widths: tuple[int, ...]
    batch_size: int
    global_patches: int
    local_patches: int
    n_local: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], backbone: torch.nn.Module) -> StepShape:
        arch = backbone.architecture
        dim, patch = arch["embed_dim"], arch["patch_size"]
        crops = config["crops"]

        def widths(head: Mapping[str, Any]) -> tuple[int, ...]:
            hidden = [head["head_hidden_dim"]] * (head["head_nlayers"] - 1)
            return (dim, *hidden, head["head_bottleneck_dim"], head["head_n_prototypes"])

        ibot_head = config["ibot"] if config["ibot"]["separate_head"] else config["dino"]
        return cls(
            embed_dim=dim,
            depth=arch["depth"],
            mlp_hidden=int(dim * arch["mlp_ratio"]),
            patch_size=patch,
            prefix_tokens=1 + arch["num_register_tokens"],
            head_widths=widths(config["dino"]),
            ibot_head_widths=widths(ibot_head),
            batch_size=config["train"]["batch_size_per_gpu"],
            global_patches=(crops["global_crops_size"] // patch) ** 3,
            local_patches=(crops["local_crops_size"] // patch) ** 3,
            n_local=crops["local_crops_number"],
        )

    def student_tokens_per_sample(self) -> int:
        return 2 * (self.prefix_tokens + self.global_patches) + self.n_local * (
            self.prefix_tokens + self.local_patches
        )


def backbone_forward_flops(shape: StepShape, n_sequences: int, n_patches: int) -> dict[str, int]:
    """Forward matmul FLOPs of the backbone on n sequences, split into its three parts."""
    dim, hidden = shape.embed_dim, shape.mlp_hidden
    tokens = shape.prefix_tokens + n_patches
    return {
        "patch_embed": n_sequences * 2 * n_patches * shape.patch_size**3 * dim,
        "linear": n_sequences * shape.depth * 2 * tokens * dim * (4 * dim + 2 * hidden),
        "attention": n_sequences * shape.depth * 4 * tokens**2 * dim,
    }


def head_forward_flops(widths: tuple[int, ...], rows: int) -> int:
    return rows * 2 * sum(a * b for a, b in itertools.pairwise(widths))


def step_flops(shape: StepShape, masked_patches: float) -> dict[str, float]:
    """Model FLOPs of one training step (formula in the module docstring)."""
    batch = shape.batch_size
    global_fwd = backbone_forward_flops(shape, 2 * batch, shape.global_patches)
    local_fwd = backbone_forward_flops(shape, shape.n_local * batch, shape.local_patches)
    student_heads = head_forward_flops(shape.head_widths, (2 + shape.n_local) * batch)
    ibot_heads = head_forward_flops(shape.ibot_head_widths, 1) * masked_patches
    teacher_heads = head_forward_flops(shape.head_widths, 2 * batch) + ibot_heads

    backbone_fwd = {key: global_fwd[key] + local_fwd[key] for key in global_fwd}
    student = (
        3 * (backbone_fwd["linear"] + backbone_fwd["attention"] + student_heads + ibot_heads)
        + 2 * backbone_fwd["patch_embed"]  # forward + weight gradient only
    )
    teacher = sum(global_fwd.values()) + teacher_heads
    koleo = 2 * 2 * batch**2 * shape.embed_dim
    attention = 3 * backbone_fwd["attention"] + global_fwd["attention"]
    return {
        "student": student,
        "teacher": teacher,
        "koleo": koleo,
        "attention": attention,
        "total": student + teacher + koleo,
    }


def mean_masked_patches(batches: list[dict[str, torch.Tensor]]) -> float:
    return float(np.mean([int(batch["masks"].sum()) for batch in batches]))


# --- running steps ---------------------------------------------------------------------


def representative_iteration(config: Mapping[str, Any]) -> int:
    """Mid-schedule: lr past warm-up, last layer unfrozen, so every update is live."""
    return config["train"]["epochs"] * config["train"]["official_epoch_length"] // 2


class Runner:
    """One variant's Pretrainer with its batches; ``steps(n)`` runs n real train steps."""

    def __init__(
        self, variant: Variant, config: dict[str, Any], device: torch.device, n_batches: int
    ):
        self.variant = variant
        self.config = config
        self.device = device
        self._work = tempfile.TemporaryDirectory(prefix="bench_training_")
        with self.precision_context():
            self.trainer = Pretrainer(
                config,
                Path(self._work.name),
                DistributedContext(rank=0, world_size=1, device=device),
                progress=False,
            )
        backbone = self.trainer.model.student["backbone"]
        if variant.compile:
            for branch in (self.trainer.model.student, self.trainer.model.teacher):
                # In place: parameter names stay unprefixed, so the EMA pairing still works.
                branch["backbone"].compile(dynamic=False)
        self.batches = synthetic_batches(config, backbone.patch_size, n_batches, device)
        self.shape = StepShape.from_config(config, backbone)
        self.iteration = representative_iteration(config)
        self._next = 0

    @contextlib.contextmanager
    def precision_context(self) -> Iterator[None]:
        """Strict fp32 matmuls unless the variant asks for TF32 (CUDA only)."""
        if self.device.type != "cuda":
            yield
            return
        previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = self.variant.tf32
        torch.backends.cudnn.allow_tf32 = self.variant.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous

    def steps(self, n: int) -> float:
        """Run n training steps; wall seconds, the device synchronised at both ends."""
        with self.precision_context():
            synchronize(self.device)
            start = time.perf_counter()
            for _ in range(n):
                batch = self.batches[self._next % len(self.batches)]
                self._next += 1
                self.trainer.train_step([batch], self.iteration, with_stats=False)
            synchronize(self.device)
            return time.perf_counter() - start

    def close(self) -> None:
        del self.trainer, self.batches
        if self.variant.compile:
            torch._dynamo.reset()  # compiled graphs hold on to the modules' tensors
        self._work.cleanup()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(args: argparse.Namespace, variants: list[Variant], device: torch.device):
    """Time every variant; returns (results, shape, masked patches per batch).

    CPU: all variants are built first and timed in interleaved rounds, so load from other
    processes on a shared machine hits all of them alike. CUDA: one variant at a time
    (built, warmed up, timed, freed), so its peak memory is its own.
    """
    base = recipe_overrides(args.recipe)
    results = {v.name: Result(v) for v in variants}
    shape = masked = None
    runners: dict[str, Runner] = {}

    def build(variant: Variant) -> Runner | None:
        nonlocal shape, masked
        config = bench_config(base, variant, preset=args.preset, batch_size=args.batch_size)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runner = Runner(variant, config, device, args.batches)
            runner.steps(args.warmup)
        except torch.OutOfMemoryError as error:
            results[variant.name].error = f"OOM ({str(error).splitlines()[0][:60]})"
            free_device_memory(device)
            return None
        shape, masked = runner.shape, mean_masked_patches(runner.batches)
        return runner

    def timed_round(runner: Runner) -> None:
        result = results[runner.variant.name]
        try:
            result.step_seconds.append(runner.steps(args.steps) / args.steps)
        except torch.OutOfMemoryError as error:
            result.error = f"OOM ({str(error).splitlines()[0][:60]})"

    if device.type == "cuda":
        for variant in variants:
            runner = build(variant)
            if runner is None:
                continue
            for _ in range(args.rounds):
                timed_round(runner)
            if results[variant.name].error is None:
                results[variant.name].peak_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
            runner.close()
            del runner
            free_device_memory(device)
    else:
        for variant in variants:
            runner = build(variant)
            if runner is not None:
                runners[variant.name] = runner
        for _ in range(args.rounds):
            for runner in runners.values():
                timed_round(runner)
        for runner in runners.values():
            runner.close()
    return list(results.values()), shape, masked


# --- reporting -------------------------------------------------------------------------


def speedup(baseline: Result, result: Result) -> float:
    """Baseline step time / variant step time: the median of per-round ratios when the
    rounds are paired (CPU interleaving, robust to load that changes between rounds),
    else the ratio of the medians."""
    if len(baseline.step_seconds) == len(result.step_seconds):
        return statistics.median(
            b / r for b, r in zip(baseline.step_seconds, result.step_seconds, strict=True)
        )
    return baseline.seconds / result.seconds


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for CPUs"
    name = torch.cuda.get_device_name(device).upper()
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{key} dense bf16"
    return None, f"unknown device {name!r}: pass --peak-tflops"


def significant(value: float) -> str:
    """Three significant digits without exponents: 0.0422, 5.61, 254, 1,234."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def report(
    args: argparse.Namespace,
    device: torch.device,
    results: list[Result],
    shape: StepShape,
    masked: float,
) -> None:
    flops = step_flops(shape, masked)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    tokens_per_sample = shape.student_tokens_per_sample()
    batch = shape.batch_size
    patch = shape.patch_size
    global_edge = round(shape.global_patches ** (1 / 3)) * patch
    local_edge = round(shape.local_patches ** (1 / 3)) * patch
    print(
        f"\nsample = 2 x {global_edge}^3 global + {shape.n_local} x {local_edge}^3 local crops; "
        f"batch {batch}; patch {patch}; D={shape.embed_dim}, depth {shape.depth}; "
        f"prototypes {shape.head_widths[-1]}"
    )
    print(
        f"student tokens per sample = 2 x {shape.prefix_tokens + shape.global_patches} + "
        f"{shape.n_local} x {shape.prefix_tokens + shape.local_patches} = {tokens_per_sample} "
        f"(CLS + {shape.prefix_tokens - 1} registers + patches)"
    )
    print(
        f"model FLOPs per step = {flops['total'] / 1e12:.4f} TFLOP (student fwd+bwd "
        f"{flops['student'] / flops['total']:.0%}, teacher fwd "
        f"{flops['teacher'] / flops['total']:.0%}; attention q k^T / a v "
        f"{flops['attention'] / flops['total']:.0%}); iBOT-masked patches per batch {masked:.0f}"
    )
    print(f"peak: {f'{peak:.0f} TFLOP/s' if peak else '-'} ({peak_source})\n")

    baseline = results[0]
    header = (
        "| variant | ms/step | samples/s | tokens/s | model TFLOP/s | MFU | peak mem GB "
        f"| vs {baseline.variant.name} |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for result in results:
        if result.error or not result.step_seconds:
            print(f"| {result.variant.name} | {result.error or 'not run'} |  |  |  |  |  |  |")
            continue
        seconds = result.seconds
        samples = batch / seconds
        achieved = flops["total"] / seconds / 1e12
        mfu = f"{achieved / peak:.1%}" if peak else "-"
        memory = f"{result.peak_memory_gb:.1f}" if result.peak_memory_gb is not None else "-"
        ratio = (
            f"{speedup(baseline, result):.2f}x"
            if baseline.step_seconds and not baseline.error
            else "-"
        )
        print(
            f"| {result.variant.name} | {1000 * seconds:.1f} | {significant(samples)} | "
            f"{samples * tokens_per_sample:,.0f} | {achieved:.3f} | {mfu} | {memory} | {ratio} |"
        )
    spread = [
        f"{r.variant.name} {1000 * min(r.step_seconds):.0f}-{1000 * max(r.step_seconds):.0f}"
        for r in results
        if r.step_seconds
    ]
    print(
        f"\nms/step = median of {args.rounds} rounds x {args.steps} steps (range: "
        f"{', '.join(spread)}); warm-up {args.warmup} steps excluded; ratio = median of "
        "per-round ratios"
    )

    if device.type == "cuda" and len(results) > 1:
        print()
        for result in results[1:]:
            if result.error or not result.step_seconds or baseline.error:
                print(f"{result.variant.name}: no verdict ({result.error or baseline.error})")
                continue
            ratio = speedup(baseline, result)
            verdicts = [
                (
                    f"speed-up {ratio:.2f}x vs {baseline.variant.name} (target >= "
                    f"{TARGET_SPEEDUP:.0f}x): {'PASS' if ratio >= TARGET_SPEEDUP else 'MISS'}"
                )
            ]
            if peak:
                mfu = flops["total"] / result.seconds / 1e12 / peak
                verdicts.append(
                    f"MFU {mfu:.1%} (target >= {TARGET_MFU:.0%}): "
                    f"{'PASS' if mfu >= TARGET_MFU else 'MISS'}"
                )
            print(f"{result.variant.name}: " + "; ".join(verdicts))


# --- FLOP formula check ------------------------------------------------------------------

CHECK_OVERRIDES: dict[str, Any] = {
    "model": {"preset": "tiny", "drop_path_rate": 0.0},
    "dino": {"head_n_prototypes": 256, "head_hidden_dim": 128, "head_bottleneck_dim": 64},
    "ibot": {"head_n_prototypes": 256, "head_hidden_dim": 128, "head_bottleneck_dim": 64},
    "crops": {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2},
    "train": {"epochs": 1, "official_epoch_length": 10},
}


def check_flops(batch_size: int = 4) -> tuple[float, float]:
    """(analytic, counted) FLOPs of one real training step of a small model on the CPU,
    counted by FlopCounterMode (eager attention, so q k^T and a v are visible matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    variant = Variant.parse("fp32-eager")
    config = bench_config(CHECK_OVERRIDES, variant, preset=None, batch_size=batch_size)
    runner = Runner(variant, config, torch.device("cpu"), n_batches=1)
    try:
        with FlopCounterMode(display=False) as counter:
            runner.steps(1)
        analytic = step_flops(runner.shape, mean_masked_patches(runner.batches))["total"]
        return analytic, float(counter.get_total_flops())
    finally:
        runner.close()


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument(
        "--recipe",
        choices=("demo", "paper"),
        default=None,
        help="demo = config/config.yaml pretrain.ssl (tiny, 48/24 crops, 4 locals, batch 8); "
        "paper = package defaults (base, 112/56 crops, 8 locals, batch 16). "
        "Default: demo on CPU, paper on CUDA",
    )
    parser.add_argument("--preset", default=None, help="ViT preset overriding the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per step")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated, baseline first (default: "
        f"CPU {','.join(CPU_VARIANTS)}; CUDA {','.join(GPU_VARIANTS)})",
    )
    parser.add_argument("--compile", action="store_true", help="add a bf16-sdpa-compile variant")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--batches", type=int, default=None, help="distinct synthetic batches")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--check-flops", action="store_true", help="only check the formula")
    parser.add_argument("--quick", action="store_true", help="smoke run: few small steps")
    args = parser.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.recipe is None:
        args.recipe = "paper" if cuda else "demo"
    variants = (
        args.variants.split(",") if args.variants else list(GPU_VARIANTS if cuda else CPU_VARIANTS)
    )
    if args.compile and "bf16-sdpa-compile" not in variants:
        variants.append("bf16-sdpa-compile")
    args.variants = [Variant.parse(name.strip()) for name in variants]
    if args.quick:
        defaults = {"steps": 2, "rounds": 1, "warmup": 1, "batches": 2}
        if args.batch_size is None and not cuda:
            args.batch_size = 2
    elif cuda:
        defaults = {"steps": 10, "rounds": 3, "warmup": 3, "batches": 4}
    else:
        defaults = {"steps": 3, "rounds": 5, "warmup": 2, "batches": 4}
    if any(v.compile for v in args.variants):
        defaults["warmup"] = max(defaults["warmup"], 3)  # compile during the first steps
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_flops:
        analytic, counted = check_flops()
        print(
            f"FLOPs of one tiny training step: formula {analytic:,.0f}, FlopCounterMode "
            f"{counted:,.0f}, ratio {analytic / counted:.4f}"
        )
        return 0 if math.isclose(analytic, counted, rel_tol=0.01) else 1

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"training-step throughput, {name}{threads}, torch {torch.__version__}, recipe "
        f"{args.recipe}{f' preset {args.preset}' if args.preset else ''}; synthetic in-memory "
        "batches (data loading excluded)"
    )
    results, shape, masked = measure(args, args.variants, device)
    if shape is None:
        for result in results:
            print(f"{result.variant.name}: {result.error}")
        return 1
    report(args, device, results, shape, masked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
