"""Smoke test of benchmarks/bench_training.py (no speed asserts: timings are not tested).

The FLOP formula the benchmark divides by is checked against torch's FlopCounterMode on one
real training step of a small model.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from voxelfm.models import build_vit

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_run_prints_throughput_table():
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--variants",
            "fp32-eager,fp32-sdpa",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "samples/s" in out and "tokens/s" in out
    assert "student tokens per sample = 2 x 221 + 4 x 32 = 570" in out
    rows = [line for line in out.splitlines() if line.startswith("| fp32-")]
    assert [row.split("|")[1].strip() for row in rows] == ["fp32-eager", "fp32-sdpa"]
    assert rows[0].rstrip().endswith("| 1.00x |")


def test_flop_formula_matches_flop_counter(bench):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        analytic, counted = bench.check_flops(batch_size=2)
    finally:
        torch.set_num_threads(previous)
    # Only the losses' einsums are counted by the counter and not by the formula.
    assert analytic == pytest.approx(counted, rel=1e-3)


def test_paper_recipe_shape_and_variants(bench):
    variant = bench.Variant.parse("bf16-sdpa-compile")
    assert (variant.precision, variant.attention, variant.compile, variant.tf32) == (
        "bf16",
        "sdpa",
        True,
        False,
    )
    with pytest.raises(ValueError):
        bench.Variant.parse("fp16-flash")
    config = bench.bench_config(
        bench.recipe_overrides("paper"), variant, preset=None, batch_size=None
    )
    assert config["model"]["overrides"]["attention_impl"] == "sdpa"
    with torch.device("meta"):
        backbone = build_vit(config["model"]["preset"])
    shape = bench.StepShape.from_config(config, backbone)
    # ViT-B/14, 2 x 112^3 + 8 x 56^3: 2 x (5 + 512) + 8 x (5 + 64) tokens, batch 16.
    assert shape.student_tokens_per_sample() == 1586 and shape.batch_size == 16
    flops = bench.step_flops(shape, masked_patches=0.0)
    assert flops["total"] == flops["student"] + flops["teacher"] + flops["koleo"]
