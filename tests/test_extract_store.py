"""The embedding store: write/read round trip, atomic writes, failures, and `voxelfm embed`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from voxelfm.cli import main
from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.embed import embed_store
from voxelfm.extract.extractor import extract_features
from voxelfm.extract.store import (
    EmbeddingRecord,
    EmbeddingStore,
    adaptive_avg_pool,
    write_embeddings,
)
from voxelfm.models.vision_transformer import build_vit
from voxelfm.models.weights import save_backbone
from voxelfm.store import VolumeStore, shard_store_name, write_scan
from voxelfm.volume import CanonicalVolume

TINY_SPEC = {"kind": "random_init", "preset": "tiny", "overrides": {"depth": 1}, "seed": 0}
F16 = {"rtol": 2e-3, "atol": 2e-3}
SHAPES = {"scan-a": (20, 17, 9), "scan-b": (16, 16, 16), "scan-c": (33, 12, 18)}


def ct_volume(shape, seed):
    rng = np.random.default_rng(seed)
    image = rng.normal(-200, 500, shape).round().clip(-1024, 3071).astype(np.int16)
    return CanonicalVolume(image, spacing=(1.5, 1.5, 1.5), origin=(-10.0 * seed, 5.0, 2.5))


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """A shard store of three small scans of two patients."""
    store = tmp_path_factory.mktemp("stores") / shard_store_name(0)
    for seed, (scan_id, shape) in enumerate(SHAPES.items()):
        write_scan(store, scan_id, f"patient-{seed // 2}", ct_volume(shape, seed), chunks=(8, 8, 8))
    return store


@pytest.fixture(scope="module")
def extractor():
    return build_extractor(TINY_SPEC, "cpu")


@pytest.fixture(scope="module")
def embedded(shard, extractor, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "tiny.zarr"
    embed_store([shard], out, extractor, name="tiny_random", progress=False, mode="whole")
    return out


def test_round_trip_global_features_and_patch_tokens(embedded, shard, extractor):
    store = EmbeddingStore(embedded)
    assert store.scan_ids == sorted(SHAPES)
    assert store.patient_ids == ["patient-0", "patient-0", "patient-1"]
    assert store.backbone_name == "tiny_random" and store.embed_dim == extractor.embed_dim
    assert store.attrs["backbone"]["kind"] == "random_init"
    assert store.attrs["n_scans"] == 3 and store.failed_scans == []
    assert store.attrs["preprocessing"]["spacing_mm"] == [[1.5, 1.5, 1.5]]
    root = zarr.open_group(embedded, mode="r")
    assert root["cls"].dtype == np.float16 and root["cls"].shape == (3, extractor.embed_dim)
    assert root["patch/scan-a"].dtype == np.float16

    volumes = VolumeStore(shard)
    cls = store.global_features("cls")
    both = store.global_features("cls+pooled")
    assert cls.dtype == np.float32 and both.shape == (3, 2 * extractor.embed_dim)
    for row, scan_id in enumerate(store.scan_ids):
        direct = extract_features(volumes.to_canonical_volume(scan_id), extractor, mode="whole")
        np.testing.assert_allclose(cls[row], direct.cls, **F16)
        np.testing.assert_allclose(both[row, extractor.embed_dim :], direct.pooled, **F16)
        tokens, grid_affine = store.patch_tokens(scan_id)
        assert tokens.dtype == np.float32 and tokens.shape == direct.patch.shape
        np.testing.assert_allclose(tokens, direct.patch, **F16)
        np.testing.assert_allclose(grid_affine, direct.grid_affine)
        geometry = store.patch_geometry(scan_id)
        assert tuple(geometry["volume_shape"]) == SHAPES[scan_id]
        assert tuple(geometry["grid_shape"]) == direct.grid_shape
    subset = store.global_features("pooled", scan_ids=["scan-c", "scan-a"])
    np.testing.assert_array_equal(subset, store.global_features("pooled")[[2, 0]])


def test_pooled_patch_grid_is_adaptive_average_pooling(embedded):
    store = EmbeddingStore(embedded)
    tokens, _ = store.patch_tokens("scan-c")  # grid (5, 2, 3): smaller than 4 on two axes
    pooled = store.pooled_patch_grid("scan-c", grid=(4, 4, 4))
    assert pooled.shape == (64, store.embed_dim)
    reference = F.adaptive_avg_pool3d(torch.from_numpy(tokens).permute(3, 0, 1, 2), (4, 4, 4))
    expected = reference.permute(1, 2, 3, 0).reshape(64, -1).numpy()
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)
    whole = adaptive_avg_pool(tokens, (1, 1, 1)).reshape(-1)
    np.testing.assert_allclose(whole, tokens.reshape(-1, tokens.shape[-1]).mean(0), atol=1e-6)


def features_for(extractor, seed):
    return extract_features(ct_volume((16, 16, 8), seed), extractor, mode="whole")


def test_a_failing_writer_leaves_no_partial_store_and_keeps_the_old_one(tmp_path, extractor):
    out = tmp_path / "emb.zarr"
    write_embeddings(out, [EmbeddingRecord("s1", "p1", features_for(extractor, 0))], extractor)
    before = EmbeddingStore(out).global_features()

    def exploding():
        yield EmbeddingRecord("s2", "p2", features_for(extractor, 1))
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_embeddings(out, exploding(), extractor)
    survivor = EmbeddingStore(out)
    assert survivor.scan_ids == ["s1"]
    np.testing.assert_array_equal(survivor.global_features(), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.zarr"]

    fresh = tmp_path / "never.zarr"
    with pytest.raises(RuntimeError):
        write_embeddings(fresh, exploding(), extractor)
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["emb.zarr"]


def test_failed_scans_are_listed_and_all_failed_is_an_error(tmp_path, extractor):
    out = tmp_path / "emb.zarr"
    records = [
        EmbeddingRecord("good", "p1", features_for(extractor, 0)),
        EmbeddingRecord("bad", "p2", error="ValueError: unreadable"),
    ]
    store = EmbeddingStore(write_embeddings(out, records, extractor))
    assert store.scan_ids == ["good"]
    assert store.failed_scans == [{"scan_id": "bad", "error": "ValueError: unreadable"}]
    with pytest.raises(VoxelFMError, match="no scan could be embedded"):
        write_embeddings(tmp_path / "none.zarr", [records[1]], extractor)
    assert not (tmp_path / "none.zarr").exists()


def test_embed_store_warns_about_a_failing_scan(shard, tmp_path, monkeypatch, capsys):
    import voxelfm.extract.embed as embed_module

    real = embed_module.extract_features
    calls = []

    def flaky(volume, *args, **kwargs):
        calls.append(volume.shape)
        if volume.shape == SHAPES["scan-b"]:
            raise ValueError("simulated\nfailure")
        return real(volume, *args, **kwargs)

    monkeypatch.setattr(embed_module, "extract_features", flaky)
    handcrafted = {"kind": "handcrafted", "bins": 8, "patch_size": 8}
    out = embed_store(shard, tmp_path / "hc.zarr", handcrafted, device="cpu", progress=False)
    store = EmbeddingStore(out)
    assert store.scan_ids == ["scan-a", "scan-c"]
    assert store.failed_scans == [{"scan_id": "scan-b", "error": "ValueError: simulated failure"}]
    assert "warning: scan scan-b: ValueError: simulated failure" in capsys.readouterr().err


def test_embedding_store_rejects_other_folders(tmp_path, shard):
    with pytest.raises(InputError, match="not an embedding store"):
        EmbeddingStore(tmp_path)
    with pytest.raises(InputError, match="not a voxelfm-embeddings store"):
        EmbeddingStore(shard)


def test_cli_embed_end_to_end_with_an_exported_backbone(shard, tmp_path, capsys):
    torch.manual_seed(0)
    backbone = tmp_path / "teacher_backbone"
    save_backbone(build_vit("tiny", depth=1), backbone, config={})
    out = tmp_path / "emb" / "voxelfm.zarr"
    spec = json.dumps({"kind": "voxelfm", "path": str(backbone)})
    argv = [
        "embed",
        "--stores",
        str(shard),
        "--backbone",
        "demo",
        "--spec",
        spec,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--mode",
        "auto",
        "--max-patches",
        "8",
        "--window",
        "16",
        "--batch-size",
        "4",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "3 scans embedded with demo" in captured.out
    assert "embed demo" in captured.err  # the progress bar
    store = EmbeddingStore(out)
    assert store.scan_ids == sorted(SHAPES) and store.backbone["kind"] == "voxelfm"
    assert store.attrs["extraction"]["max_patches"] == 8
    assert store.attrs["modes"] == ["sliding", "whole", "sliding"]  # 18, 8 and 30 patches
    assert store.global_features("pooled").shape == (3, 192)


def test_cli_embed_missing_backbone_is_one_line(shard, tmp_path, capsys):
    missing = tmp_path / "no_backbone"
    spec = json.dumps({"kind": "voxelfm", "path": str(missing)})
    argv = [
        "embed",
        "--stores",
        str(shard),
        "--backbone",
        "x",
        "--spec",
        spec,
        "--out",
        str(tmp_path / "out.zarr"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("voxelfm embed: error:") and str(missing) in err
    assert "\n" not in err and not (tmp_path / "out.zarr").exists()
