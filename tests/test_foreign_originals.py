"""Adapters against the models' original packages (opt-in: marker ``originals``).

Each test builds the original module with random weights (for CT-FM the whole encoder,
saved in the release's file layout and loaded through our adapter) and compares outputs. The original
packages are not project dependencies; a test skips when its package is absent, so the
default CI run skips them. To run them::

    pip install --no-deps lighter-zoo        # CT-FM (needs monai, huggingface_hub, safetensors)
    pip install --no-deps vector-quantize-pytorch==1.1.2 einops   # CT-CLIP quantiser
    python -m pytest -q -m originals tests/test_foreign_originals.py

(``--no-deps`` because lighter-zoo also pins jupyter, which the encoder does not use.)
Merlin's ``merlin-vlm`` is not covered: it needs torchvision, transformers, peft and
accelerate and downloads weights when its model is built (see docs/foreign_backbones.md).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxelfm.extract import extract_features
from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.foreign import ct_fm

pytestmark = pytest.mark.originals


def ctfm_original_pipeline(path):
    """scripts/feature_extractor.py of project-lighter/CT-FM (its transforms, as written)."""
    transforms = pytest.importorskip("monai.transforms")
    pipeline = transforms.Compose(
        [
            transforms.LoadImaged(keys=["image"], ensure_channel_first=True),
            transforms.EnsureTyped(keys=["image"]),
            transforms.Orientationd(keys=["image"], axcodes="SPL"),
            transforms.Spacingd(keys=["image"], pixdim=[3, 1, 1], mode="bilinear"),
            transforms.CropForegroundd(keys=["image"], source_key="image"),
            transforms.ScaleIntensityRanged(
                keys="image", a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True
            ),
        ]
    )
    return pipeline({"image": str(path)})["image"].as_tensor().float()


def body_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    inner = tuple(slice(n // 6, n - n // 6) for n in shape)
    hu[inner] = rng.normal(-200, 400, [s.stop - s.start for s in inner])
    return hu


def test_ct_fm_matches_lighter_zoo_segresencoder(tmp_path):
    lighter_zoo = pytest.importorskip("lighter_zoo", reason="lighter-zoo is not installed")
    torch.manual_seed(0)
    original = lighter_zoo.SegResEncoder(
        spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4, 4)
    ).eval()
    release = tmp_path / "ct_fm_feature_extractor"
    original.save_pretrained(release)  # model.safetensors + config.json, as on the Hub
    config = json.loads((release / "config.json").read_text())
    assert config == {**ct_fm.ARCHITECTURE, "blocks_down": list(ct_fm.ARCHITECTURE["blocks_down"])}
    extractor = build_extractor(
        {"kind": "ct_fm", "path": str(release / "model.safetensors")}, "cpu"
    )

    # LPS-stored at CT-FM's own spacing: both pipelines only reorient, so inputs are equal.
    data = body_volume((64, 48, 20))
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 3.0, 1.0])), path)
    x = ctfm_original_pipeline(path)
    ours, _ = extractor.prepare(torch.from_numpy(data[::-1, ::-1].copy())[None])
    torch.testing.assert_close(ours, x)
    with torch.inference_mode():
        expected = original(x[None])[-1][0].mean(dim=(1, 2, 3))
    features = extract_features(path, extractor, mode="whole")
    torch.testing.assert_close(torch.from_numpy(features.cls), expected, rtol=1e-4, atol=1e-5)

    # Another spacing: MONAI's Spacing and our resampling onto the canonical grid differ by
    # interpolation details only.
    coarse = tmp_path / "coarse.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-1.5, -1.5, 2.0, 1.0])), coarse)
    with torch.inference_mode():
        expected = original(ctfm_original_pipeline(coarse)[None])[-1][0].mean(dim=(1, 2, 3))
    features = extract_features(coarse, extractor, mode="whole")
    cosine = F.cosine_similarity(torch.from_numpy(features.cls), expected, dim=0)
    assert cosine > 0.99


def test_ct_clip_quantiser_matches_vector_quantize_pytorch():
    """CT-CLIP's VQ is vector-quantize-pytorch's CosineSimCodebook (CT-CLIP pins 1.1.2);
    trained rows are below unit norm after the EMA update, so test such rows."""
    vq = pytest.importorskip(
        "vector_quantize_pytorch.vector_quantize_pytorch", reason="vector-quantize-pytorch absent"
    )
    from voxelfm.extract.foreign.ct_clip import _CosineCodebook

    torch.manual_seed(1)
    original = vq.CosineSimCodebook(dim=32, codebook_size=256).eval()
    rows = F.normalize(torch.randn(1, 256, 32), dim=-1) * torch.empty(1, 256, 1).uniform_(0.3, 1)
    original.embed.copy_(rows)
    ours = _CosineCodebook(codebook_size=256, dim=32)
    ours.load_state_dict({"embed": rows})
    tokens = torch.randn(3000, 32)
    with torch.no_grad():
        expected, _ = original(tokens[None])  # (batch, tokens, dim) as the VQ layer passes
    expected = expected[0]
    torch.testing.assert_close(ours(tokens, chunk=512), expected, rtol=0, atol=0)
