"""The Python API: `voxelfm.load_backbone(spec).embed(...)`, the README's example as written,
a cheap `import voxelfm`, and the random_init warning."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import REPO_ROOT
from io_fixtures import synthetic_ct, write_nifti

import voxelfm
from voxelfm.api import backbone_config
from voxelfm.errors import VoxelFMError
from voxelfm.extract.backbones import build_extractor


def readme_python_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
        # The shapes the README's comment promises are the ones printed.
        for comment in re.findall(r"print\((?:.*?)\)\s*#\s*(\(.*)", block):
            if comment.startswith("(") and "," in comment:
                assert comment.strip() in printed.getvalue().replace("\n", " "), printed.getvalue()


def test_importing_voxelfm_does_not_import_torch():
    code = (
        "import sys, voxelfm; voxelfm.load_backbone; "
        "print('torch' in sys.modules, 'SimpleITK' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


def test_embed_gives_tokens_with_their_world_geometry(tmp_path):
    backbone = voxelfm.load_backbone("handcrafted", device="cpu")
    hu = np.full((32, 24, 16), -1000.0, dtype=np.float32)
    hu[8:16, 8:16, 8:16] = 1000.0  # a bright cube in token (1, 1, 1) of the 8-voxel grid
    features = backbone.embed(hu, spacing=(2.0, 2.0, 2.0), origin=(-10.0, 5.0, 100.0))
    assert features.patch.shape[:3] == (4, 3, 2)
    # token (1, 1, 1) covers voxels 8..15: centre voxel 11.5 -> origin + 11.5 * 2 mm
    np.testing.assert_allclose(features.token_centres()[1, 1, 1], [13.0, 28.0, 123.0])
    # tokens see their own patch: the cube's token differs from air, two air tokens agree
    assert not np.allclose(features.patch[1, 1, 1], features.patch[0, 0, 0])
    np.testing.assert_allclose(features.patch[0, 0, 0], features.patch[3, 2, 1])

    path = write_nifti(synthetic_ct(size=(24, 20, 16)), tmp_path / "scan.nii.gz")
    from_file = backbone.embed(str(path))
    assert from_file.spacing == (1.5, 1.5, 1.5)
    assert from_file.meta["source_format"] == "nifti"


@pytest.mark.parametrize(
    ("short", "kind"),
    [
        ("tiny", "random_init"),
        ("handcrafted", "handcrafted"),
        ('{"kind": "handcrafted"}', "handcrafted"),
    ],
)
def test_short_backbone_forms(short, kind):
    assert backbone_config(short)["kind"] == kind


def test_a_folder_or_checkpoint_path_names_its_kind(tmp_path):
    assert backbone_config(str(tmp_path)) == {"kind": "voxelfm", "path": str(tmp_path)}
    checkpoint = tmp_path / "teacher_checkpoint.pth"
    checkpoint.write_bytes(b"")
    assert backbone_config(str(checkpoint))["kind"] == "published_voxelfm"
    with pytest.raises(VoxelFMError, match="neither a preset"):
        backbone_config(str(tmp_path / "missing"))


def test_random_init_with_the_papers_layerscale_warns_and_the_preset_form_does_not():
    with pytest.warns(UserWarning, match="LayerScale 1e-05: its blocks barely act"):
        muted = build_extractor({"kind": "random_init", "preset": "tiny"}, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        usable = voxelfm.load_backbone("tiny", device="cpu").extractor
    # The warning is about something real: the muted model's CLS vector is thousands of
    # times smaller (LayerNorm's epsilon dominates: the blocks' output is scaled by 1e-5).
    import torch

    scan = torch.from_numpy(np.random.default_rng(0).normal(0, 300, (1, 1, 32, 32, 32)))
    muted_cls, _ = muted(scan.float())
    usable_cls, _ = usable(scan.float())
    assert muted_cls.abs().mean() < 1e-2 * usable_cls.abs().mean()
