"""Golden test: three self-distillation steps replayed against the reference implementation.

The fixture (``fixture.pt`` and its README, computed with rmaguado/VoxelFM) holds a tiny
float64 model's initial weights, three steps of crops and iBOT masks, and the reference's
losses, step-0 gradients, final teacher and centres. The replay goes through the public
``SelfDistillationModel`` (built from a resolved config with the trainable weight-norm gain,
the default), ``update_teacher_`` and ``SelfDistillationModel.update_centres``, with the
README's plain SGD update, and compares within the README's tolerances.

The folder comes from $VOXELFM_SSL_REFERENCE, else ../shared/fixtures/ssl_reference beside
the repository; the test skips when it is absent (it is not part of the project).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from voxelfm.ssl.ema import update_teacher_
from voxelfm.train.config import resolve_ssl_config
from voxelfm.train.settings import SSLSettings
from voxelfm.train.ssl_model import SelfDistillationModel

REPO_ROOT = Path(__file__).resolve().parents[1]

LOSS_NAMES = ("dino", "ibot", "koleo", "total")
# Relative tolerances from the fixture's README.
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-4
STATE_RTOL = 1e-6


def reference_fixture_path() -> Path | None:
    env = os.environ.get("VOXELFM_SSL_REFERENCE")
    folder = Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures" / "ssl_reference"
    path = folder / "fixture.pt"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def reference() -> dict:
    path = reference_fixture_path()
    if path is None:
        pytest.skip(
            "SSL reference fixture not found: set VOXELFM_SSL_REFERENCE to the folder holding "
            "fixture.pt (../shared/fixtures/ssl_reference beside the repository by default)"
        )
    return torch.load(path, weights_only=True)


def config_from_reference(ref: dict, *, trainable_gain: bool = True) -> dict:
    """Our resolved SSL config for the fixture's plain hyper-parameter dict."""
    c = ref["config"]
    head = {
        "head_n_prototypes": c["head_n_prototypes"],
        "head_bottleneck_dim": c["head_bottleneck_dim"],
        "head_hidden_dim": c["head_hidden_dim"],
        "head_nlayers": c["head_nlayers"],
        "head_weight_norm_gain_trainable": trainable_gain,
    }
    return resolve_ssl_config(
        {
            "model": {
                "preset": "tiny",
                "drop_path_rate": c["drop_path_rate"],
                "overrides": {
                    "patch_size": c["patch_size"],
                    "embed_dim": c["embed_dim"],
                    "depth": c["depth"],
                    "num_heads": c["num_heads"],
                    "mlp_ratio": c["mlp_ratio"],
                    "num_register_tokens": c["num_register_tokens"],
                    "layerscale_init": c["layerscale_init"],
                    "rope_base": c["rope_base"],
                    "rope_rescale_coords": c["rope_rescale_coords"],
                    "qkv_bias": c["qkv_bias"],
                    "proj_bias": c["proj_bias"],
                    "ffn_bias": c["ffn_bias"],
                },
            },
            "dino": {
                **head,
                "loss_weight": c["dino_loss_weight"],
                "koleo_loss_weight": c["koleo_loss_weight"],
                "student_temp": c["student_temp"],
                "teacher_normalisation": c["teacher_normalisation"],
                "center_momentum": c["center_momentum"],
            },
            "ibot": {
                **head,
                "loss_weight": c["ibot_loss_weight"],
                "separate_head": c["ibot_separate_head"],
            },
        }
    )


def replay(ref: dict, *, trainable_gain: bool = True):
    """Run the fixture's three steps; returns (per-step losses, step-0 grads, model)."""
    config = config_from_reference(ref, trainable_gain=trainable_gain)
    model = SelfDistillationModel(SSLSettings.from_config(config))
    model = model.double()
    model.student.load_state_dict(ref["student_init"])
    model.teacher.load_state_dict(ref["teacher_init"])
    model.train()
    losses, step0_grads = [], {}
    for index, step in enumerate(ref["steps"]):
        out = model(
            step["global_crops"].unsqueeze(1),
            step["local_crops"].unsqueeze(1),
            step["masks"],
            step["teacher_temp"],
        )
        losses.append({name: float(getattr(out, name).detach()) for name in LOSS_NAMES})
        model.student.zero_grad(set_to_none=True)
        out.total.backward()
        if index == 0:
            step0_grads = {
                name: p.grad.detach().clone()
                for name, p in model.student.named_parameters()
                if p.grad is not None
            }
        with torch.no_grad():
            for p in model.student.parameters():
                if p.grad is not None:
                    p.sub_(step["sgd_lr"] * p.grad)
        update_teacher_(model.teacher, model.student, step["ema_momentum"])
        model.update_centres()
    return losses, step0_grads, model


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got.to(want.dtype) - want).abs().max().item() / (scale if scale else 1.0)


@pytest.fixture(scope="module")
def replayed(reference):
    return replay(reference)


def test_losses_match_the_reference_at_every_step(reference, replayed):
    losses, _, _ = replayed
    for index, (got, step) in enumerate(zip(losses, reference["steps"], strict=True)):
        for name in LOSS_NAMES:
            want = step[f"{name}_loss"]
            assert abs(got[name] - want) <= LOSS_RTOL * abs(want), (index, name, got[name], want)


def test_step0_gradients_match_including_the_weight_norm_gain(reference, replayed):
    _, grads, _ = replayed
    want = reference["steps"][0]["grads"]
    assert set(grads) == set(want)
    assert "dino_head.last_layer.parametrizations.weight.original0" in grads
    for name, tensor in want.items():
        assert max_relative_error(grads[name], tensor) <= GRAD_RTOL, name


def test_final_teacher_and_centres_match(reference, replayed):
    _, _, model = replayed
    teacher = model.teacher.state_dict()
    assert set(teacher) == set(reference["teacher_final"])
    for name, tensor in reference["teacher_final"].items():
        assert max_relative_error(teacher[name], tensor) <= STATE_RTOL, name
    centres = {
        "dino_centre_final": model.dino_loss.teacher_targets.centre,
        "ibot_centre_final": model.ibot_loss.teacher_targets.centre,
    }
    for key, got in centres.items():
        assert max_relative_error(got.reshape(-1), reference[key]) <= STATE_RTOL, key


def test_frozen_gain_option_matches_step0_but_drifts_afterwards(reference):
    """The documented frozen-gain option is the only deviation: same first step, then the
    gain's missing update moves later losses beyond the tolerance (as the README says)."""
    losses, grads, _ = replay(reference, trainable_gain=False)
    assert "dino_head.last_layer.parametrizations.weight.original0" not in grads
    first = reference["steps"][0]
    assert abs(losses[0]["total"] - first["total_loss"]) <= LOSS_RTOL * abs(first["total_loss"])
    later = [
        abs(got["total"] - step["total_loss"]) / abs(step["total_loss"])
        for got, step in zip(losses[1:], reference["steps"][1:], strict=True)
    ]
    assert max(later) > 100 * LOSS_RTOL
