"""Backbone plug-ins: every kind builds and gives the right shapes, weights load as saved,
normalisation is the training one, random init is a seeded same-shape control (the
handcrafted baseline's exactness: test_extract_handcrafted.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract.backbones import BACKBONE_KINDS, build_extractor, register_backbone
from voxelfm.extract.interface import FeatureExtractor, resolve_device
from voxelfm.extract.normalisation import HUNormalisation, standardise_hu
from voxelfm.models.vision_transformer import build_vit
from voxelfm.models.weights import save_backbone
from voxelfm.ssl.multicrop import MultiCropSettings

CROPS_CONFIG = {
    "hu_clip": [-1000.0, 2000.0],
    "normalisation_mean": -500.0,
    "normalisation_std": 400.0,
}


def tiny_vit(seed: int = 1, **overrides):
    torch.manual_seed(seed)
    model = build_vit("tiny", depth=1, **overrides)
    with torch.no_grad():  # non-trivial values for every parameter (LayerScale, tokens...)
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


# Module-scoped: building even a tiny ViT costs a few tenths of a second on a busy CPU.
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_vit()
    path = tmp_path_factory.mktemp("exported") / "teacher_backbone"
    save_backbone(model, path, config={"crops": {"global_crops_size": 32, **CROPS_CONFIG}})
    return model, path


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A checkpoint in the reference's released layout: {"teacher": {"backbone.*", heads}}."""
    model = tiny_vit(seed=3)
    entries = {f"backbone.{name}": t.clone() for name, t in model.state_dict().items()}
    entries["dino_head.mlp.0.weight"] = torch.randn(16, model.embed_dim)
    entries["ibot_head.mlp.0.weight"] = torch.randn(16, model.embed_dim)
    path = tmp_path_factory.mktemp("published") / "teacher_checkpoint.pth"
    torch.save({"teacher": entries}, path)
    return model, path


def hu_batch(batch=2, shape=(16, 24, 8), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, *shape, generator=generator) * 500).clamp(-1024, 3071)


def all_specs(exported_path, published_path):
    return {
        "voxelfm": {"kind": "voxelfm", "path": str(exported_path)},
        "published_voxelfm": {
            "kind": "published_voxelfm",
            "path": str(published_path),
            "preset": "tiny",
            "overrides": {"depth": 1},
        },
        "random_init_like": {"kind": "random_init", "like": str(exported_path), "seed": 0},
        "random_init_preset": {
            "kind": "random_init",
            "preset": "tiny",
            "overrides": {"depth": 1},
            "seed": 0,
        },
        "handcrafted": {"kind": "handcrafted", "bins": 16, "patch_size": 8},
    }


@pytest.mark.parametrize(
    "which",
    ["voxelfm", "published_voxelfm", "random_init_like", "random_init_preset", "handcrafted"],
)
def test_every_kind_builds_and_returns_the_right_shapes(which, exported, published):
    spec = all_specs(exported[1], published[1])[which]
    extractor = build_extractor(spec, "cpu")
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.kind == spec["kind"] and extractor.patch_size == 8
    cls, patch = extractor(hu_batch())
    dim = extractor.embed_dim
    assert cls.shape == (2, dim) and cls.dtype == torch.float32
    assert patch.shape == (2, 2, 3, 1, dim) and patch.dtype == torch.float32
    assert torch.isfinite(cls).all() and torch.isfinite(patch).all()
    description = extractor.describe()
    assert description["kind"] == spec["kind"] and description["embed_dim"] == dim
    assert description["spec"] == spec


def test_a_fresh_interpreter_finds_every_built_in_kind_in_the_registry():
    """The registry lists the built-in kinds itself: nothing depends on import side effects."""
    code = (
        "from voxelfm.extract.backbones import BACKBONE_KINDS, build_extractor\n"
        "print(' '.join(sorted(BACKBONE_KINDS)))\n"
        "build_extractor({'kind': 'handcrafted'}, 'cpu')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    kinds = set(result.stdout.split())
    assert kinds == {
        *("voxelfm", "published_voxelfm", "random_init", "handcrafted"),
        *("merlin", "ct_fm", "m3d_clip", "ct_clip", "radfm"),
    }


def test_exported_backbone_round_trips_with_its_training_normalisation(exported):
    model, path = exported
    extractor = build_extractor({"kind": "voxelfm", "path": str(path)}, "cpu")
    loaded = extractor.model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    assert extractor.normalisation == HUNormalisation((-1000.0, 2000.0), -500.0, 400.0)
    hu = hu_batch()
    cls, patch = extractor(hu)
    with torch.inference_mode():
        expected = model(standardise_hu(hu, (-1000.0, 2000.0), -500.0, 400.0))
    torch.testing.assert_close(cls, expected.x_norm_clstoken, rtol=0, atol=0)
    torch.testing.assert_close(patch, expected.patch_grid(), rtol=0, atol=0)


def test_config_without_crops_uses_the_recipe_defaults(tmp_path):
    save_backbone(tiny_vit(), tmp_path / "b", config={})
    extractor = build_extractor({"kind": "voxelfm", "path": str(tmp_path / "b")}, "cpu")
    recipe = MultiCropSettings()
    assert extractor.normalisation == HUNormalisation(
        recipe.hu_clip, recipe.normalisation_mean, recipe.normalisation_std
    )


def test_multicrop_render_uses_the_shared_normalisation():
    """Training crops and extraction go through the same function (no second formula)."""
    from voxelfm.ssl import multicrop

    assert multicrop.standardise_hu is standardise_hu


def test_published_checkpoint_loads_and_feeds_the_reference_axis_order(published):
    model, path = published
    spec = {
        "kind": "published_voxelfm",
        "path": str(path),
        "preset": "tiny",
        "overrides": {"depth": 1},
    }
    extractor = build_extractor(spec, "cpu")
    assert extractor.input_axes == "zyx"
    assert extractor.normalisation == HUNormalisation()  # reference recipe: clip + standardise
    hu = hu_batch(batch=1, shape=(16, 24, 8))
    cls, patch = extractor(hu)
    with torch.inference_mode():
        reference = model(HUNormalisation()(hu).permute(0, 1, 4, 3, 2))
    torch.testing.assert_close(cls, reference.x_norm_clstoken, rtol=0, atol=0)
    # Tokens come back on the canonical (X, Y, Z) grid.
    assert patch.shape[1:4] == (2, 3, 1)
    torch.testing.assert_close(patch, reference.patch_grid().permute(0, 3, 2, 1, 4), rtol=0, atol=0)

    plain = build_extractor(
        {**spec, "input_axes": "xyz", "normalisation": {"hu_clip": None}}, "cpu"
    )
    with torch.inference_mode():
        expected = model((hu + 573.8) / 461.3)  # reference inference: no clip
    torch.testing.assert_close(plain(hu)[0], expected.x_norm_clstoken, rtol=1e-6, atol=1e-6)


def test_random_init_like_has_the_architecture_but_new_seeded_weights(exported):
    model, path = exported
    spec = {"kind": "random_init", "like": str(path), "seed": 7}
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = build_extractor(spec, "cpu")
    assert torch.equal(torch.rand(3), before), "the global RNG must be left as it was"
    second = build_extractor(spec, "cpu")
    other = build_extractor({**spec, "seed": 8}, "cpu")
    assert first.model.architecture == model.architecture
    reference = model.state_dict()
    for name, tensor in first.model.state_dict().items():
        assert tensor.shape == reference[name].shape
        torch.testing.assert_close(tensor, second.model.state_dict()[name], rtol=0, atol=0)
    assert not torch.equal(first.model.patch_embed.proj.weight, model.patch_embed.proj.weight)
    assert not torch.equal(
        first.model.blocks[0].attn.qkv.weight, other.model.blocks[0].attn.qkv.weight
    )
    assert first.normalisation == HUNormalisation((-1000.0, 2000.0), -500.0, 400.0)
    hu = hu_batch()
    torch.testing.assert_close(first(hu)[0], second(hu)[0], rtol=0, atol=0)


def test_random_init_needs_exactly_one_of_like_or_preset(exported):
    with pytest.raises(VoxelFMError, match="exactly one"):
        build_extractor({"kind": "random_init", "seed": 0}, "cpu")
    with pytest.raises(VoxelFMError, match="exactly one"):
        build_extractor({"kind": "random_init", "like": str(exported[1]), "preset": "tiny"}, "cpu")


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "voxelfm", "path": "/no/such/backbone"},
        {"kind": "published_voxelfm", "path": "/no/such/checkpoint.pth"},
        {"kind": "random_init", "like": "/no/such/backbone"},
    ],
)
def test_missing_files_are_one_line_input_errors_naming_the_path(spec):
    with pytest.raises(InputError, match="/no/such/") as error:
        build_extractor(spec, "cpu")
    assert "\n" not in str(error.value)


def test_unknown_kind_and_unknown_options_are_user_errors():
    with pytest.raises(VoxelFMError, match="unknown backbone kind 'nope'"):
        build_extractor({"kind": "nope"}, "cpu")
    with pytest.raises(VoxelFMError, match="unknown keys colour"):
        build_extractor({"kind": "handcrafted", "colour": "red"}, "cpu")
    with pytest.raises(VoxelFMError, match="missing path"):
        build_extractor({"kind": "voxelfm"}, "cpu")
    with pytest.raises(VoxelFMError, match="precision"):
        build_extractor({"kind": "handcrafted"}, "cpu", precision="fp8")


def test_a_new_kind_plugs_in_through_the_registry():
    class MeanHU(FeatureExtractor):
        kind = "mean_hu_test"

        def __init__(self, device):
            self.name, self.embed_dim, self.patch_size = "mean_hu", 1, None
            self.device, self.config = device, {"kind": "mean_hu_test"}

        def forward(self, hu, valid=None):
            return hu.flatten(1).mean(1, keepdim=True), None

    register_backbone("mean_hu_test")(lambda spec, device, precision: MeanHU(device))
    try:
        extractor = build_extractor({"kind": "mean_hu_test"}, "cpu")
        cls, patch = extractor(torch.full((1, 1, 4, 4, 4), 7.0))
        assert patch is None and cls.item() == 7.0
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("mean_hu_test")(lambda *a: None)
    finally:
        del BACKBONE_KINDS["mean_hu_test"]


def test_auto_device_is_cpu_without_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(VoxelFMError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.parametrize("kind", ["merlin", "ct_fm", "m3d_clip", "ct_clip", "radfm"])
@pytest.mark.parametrize("seed", ["3", 1.5, True])
def test_a_foreign_seed_that_is_not_an_integer_is_a_one_line_error(kind, seed):
    with pytest.raises(VoxelFMError, match=f"{kind}: seed must be an integer"):
        build_extractor({"kind": kind, "random_weights": True, "seed": seed}, "cpu")
