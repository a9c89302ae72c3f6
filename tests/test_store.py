"""The Zarr volume store: round trip, padded crops, fast reader vs zarr, errors, pickling."""

from __future__ import annotations

import itertools
import multiprocessing
import pickle

import numpy as np
import pytest
import zarr
from zarr.codecs import GzipCodec

from voxelfm.conventions import HU_MIN
from voxelfm.errors import InputError
from voxelfm.store import (
    VolumeStore,
    delete_scan,
    list_complete_scans,
    make_compressor,
    shard_store_name,
    write_scan,
)
from voxelfm.store.chunk_reader import ChunkReader
from voxelfm.volume import CanonicalVolume

SHAPE = (37, 45, 29)  # no axis a multiple of the test chunks: edge chunks everywhere
SMALL_CHUNKS = (8, 16, 8)


def ct_like_volume(shape=SHAPE, seed=0) -> CanonicalVolume:
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 300, shape).round().clip(-1024, 3071).astype(np.int16)
    image[:5] = HU_MIN  # a slab of padding: chunks zarr may skip writing
    organs = (rng.random(shape) > 0.7).astype(np.uint8) * 3
    big_labels = rng.integers(0, 300, shape).astype(np.uint16)
    return CanonicalVolume(
        image,
        spacing=(1.5, 1.5, 2.0),
        origin=(-10.0, 20.5, 300.0),
        labels={"organs": organs, "big": big_labels},
        meta={
            "original_shape": [20, 30, 40],
            "original_spacing": [0.7, 0.7, 1.25],
            "original_axcodes": "LPS",
            "source_format": "dicom",
            "source_sha256": "ab" * 32,
            "warnings": ["something odd"],
            "PatientName": "DOE^JOHN",  # must never reach the store
            "PatientBirthDate": "19700101",
        },
    )


@pytest.fixture
def stored(tmp_path):
    volume = ct_like_volume()
    store_path = tmp_path / shard_store_name(0)
    write_scan(store_path, "scan-1", "patient-7", volume, chunks=SMALL_CHUNKS)
    return VolumeStore(tmp_path), volume, store_path


def padded_reference(array: np.ndarray, start, size, fill) -> np.ndarray:
    """Crop by plain numpy on an array padded generously with ``fill``."""
    margin = max(max(abs(s) for s in start), max(size)) + max(array.shape)
    padded = np.pad(array, margin, constant_values=fill)
    return padded[tuple(slice(s + margin, s + margin + n) for s, n in zip(start, size))]


def test_round_trip_values_geometry_and_labels(stored):
    store, volume, _ = stored
    assert store.scan_ids == ["scan-1"]
    assert store.patient_id("scan-1") == "patient-7"
    assert store.shape("scan-1") == SHAPE
    back = store.to_canonical_volume("scan-1")
    np.testing.assert_array_equal(back.image, volume.image)
    assert back.image.dtype == np.int16
    assert back.spacing == volume.spacing and back.origin == volume.origin
    assert back.labels.keys() == volume.labels.keys()
    np.testing.assert_array_equal(back.labels["organs"], volume.labels["organs"])
    np.testing.assert_array_equal(back.labels["big"], volume.labels["big"])
    assert back.labels["organs"].dtype == np.uint8
    assert back.labels["big"].dtype == np.uint16  # values above 255 need 16 bits


def test_attributes_hold_provenance_and_no_patient_identifiers(stored):
    store, volume, store_path = stored
    attrs = store.attrs("scan-1")
    assert attrs["scan_id"] == "scan-1"
    assert attrs["axcodes"] == "RAS"
    assert attrs["spacing"] == [1.5, 1.5, 2.0]
    assert attrs["origin"] == [-10.0, 20.5, 300.0]
    np.testing.assert_allclose(attrs["affine"], volume.affine)
    assert attrs["original_shape"] == [20, 30, 40]
    assert attrs["original_axcodes"] == "LPS"
    assert attrs["source_format"] == "dicom"
    assert attrs["source_sha256"] == "ab" * 32
    assert attrs["hu_range"] == [-1024, 3071]
    assert attrs["warnings"] == ["something odd"]
    assert attrs["preprocessing_version"]
    on_disk = "".join(p.read_text() for p in store_path.rglob("zarr.json"))
    assert "DOE^JOHN" not in on_disk and "19700101" not in on_disk
    assert "PatientName" not in on_disk


def _corner_and_face_crops():
    size = (12, 20, 10)
    starts_per_axis = [(-5, 0, 10, n - 7, n + 3) for n in SHAPE]  # before, at, inside, across, past
    return [(start, size) for start in itertools.product(*starts_per_axis)]


@pytest.mark.parametrize(
    "start,size",
    _corner_and_face_crops()[::4]
    + [
        ((-10, -10, -10), (60, 70, 50)),  # crop larger than the whole volume
        ((100, 0, 0), (8, 8, 8)),  # entirely outside: all padding
        ((0, 0, 0), SHAPE),
    ],
)
def test_crops_match_numpy_slicing_with_padding(stored, start, size):
    store, volume, _ = stored
    crop = store.read_crop("scan-1", start, size)
    assert crop.shape == size and crop.dtype == np.int16
    np.testing.assert_array_equal(crop, padded_reference(volume.image, start, size, HU_MIN))
    label = store.read_label_crop("scan-1", "organs", start, size)
    np.testing.assert_array_equal(label, padded_reference(volume.labels["organs"], start, size, 0))


@pytest.mark.parametrize("compressor", ["blosc-lz4-shuffle-5", "none", "gzip"])
def test_read_crops_equals_one_read_crop_per_crop(tmp_path, compressor):
    """Overlapping, padded, outside and whole-volume crops in one call: each chunk is
    decoded once and scattered to every crop, with the same result as separate reads."""
    volume = ct_like_volume(seed=4)
    store_path = tmp_path / "s.zarr"
    codec = GzipCodec(level=1) if compressor == "gzip" else make_compressor(compressor)
    write_scan(store_path, "a", "p", volume, chunks=SMALL_CHUNKS, compressor=codec)
    store = VolumeStore(store_path)
    rng = np.random.default_rng(1)
    crops = _corner_and_face_crops()[::3] + [
        ((0, 0, 0), SHAPE),
        ((-10, -10, -10), (60, 70, 50)),
        ((100, 0, 0), (8, 8, 8)),
    ]
    for _ in range(20):  # many crops over the same chunks
        size = tuple(int(rng.integers(1, n + 1)) for n in SHAPE)
        crops.append((tuple(int(rng.integers(-3, n - 2)) for n in SHAPE), size))
    crops.append(crops[-1])  # the same crop twice
    many = store.read_crops("a", crops)
    assert len(many) == len(crops)
    for (start, size), crop in zip(crops, many):
        assert crop.shape == size and crop.dtype == np.int16 and crop.flags.c_contiguous
        np.testing.assert_array_equal(crop, padded_reference(volume.image, start, size, HU_MIN))
        np.testing.assert_array_equal(crop, store.read_crop("a", start, size))
    assert store.read_crops("a", []) == []
    many[-1][...] = 0  # crops are independent arrays, even for identical requests
    assert not (many[-2] == 0).all()
    with pytest.raises(ValueError):
        store.read_crops("a", [((0, 0, 0), (0, 4, 4))])


def test_every_border_is_padded_with_the_right_value(stored):
    store, volume, _ = stored
    for axis in range(3):
        for side in (-1, 1):
            start = [0, 0, 0]
            start[axis] = -3 if side < 0 else SHAPE[axis] - 2
            crop = store.read_crop("scan-1", tuple(start), (5, 5, 5))
            outside = [slice(None)] * 3
            outside[axis] = slice(0, 3) if side < 0 else slice(2, 5)
            assert (crop[tuple(outside)] == HU_MIN).all()
            np.testing.assert_array_equal(
                crop, padded_reference(volume.image, start, (5, 5, 5), HU_MIN)
            )


@pytest.mark.parametrize(
    "compressor", ["none", "zstd-3", "blosc-lz4-shuffle-5", "blosc-zstd-bitshuffle-1"]
)
def test_fast_reader_matches_zarr_slicing(tmp_path, compressor):
    volume = ct_like_volume(seed=1)
    store_path = tmp_path / "s.zarr"
    write_scan(
        store_path, "a", "p", volume, chunks=(16, 8, 16), compressor=make_compressor(compressor)
    )
    array = zarr.open_array(store_path / "a" / "image", mode="r")
    reader = ChunkReader.for_array(array, store_path / "a" / "image")
    assert reader is not None
    rng = np.random.default_rng(0)
    for _ in range(20):
        lo = [int(rng.integers(0, n)) for n in SHAPE]
        hi = [int(rng.integers(low + 1, n + 1)) for low, n in zip(lo, SHAPE)]
        np.testing.assert_array_equal(
            reader.read(lo, hi), array[tuple(slice(a, b) for a, b in zip(lo, hi))]
        )


@pytest.mark.parametrize("compressor", ["none", "blosc-lz4-shuffle-5", "blosc-zstd-bitshuffle-1"])
def test_directly_written_shards_read_back_in_zarr_like_zarrs_own(tmp_path, compressor):
    """write_scan encodes the shard file itself; zarr (which checks the index CRC32C) reads
    it back exactly, empty chunks are left out as zarr does, and an all-padding array has
    no file at all."""
    volume = ct_like_volume(seed=2)
    volume.image[:8] = HU_MIN  # a whole chunk's worth of padding, not stored
    volume.labels["empty"] = np.zeros(SHAPE, dtype=np.uint8)
    store_path = tmp_path / "s.zarr"
    codec = make_compressor(compressor)
    write_scan(store_path, "a", "p", volume, chunks=SMALL_CHUNKS, compressor=codec)
    image = zarr.open_array(store_path / "a" / "image", mode="r")
    np.testing.assert_array_equal(image[...], volume.image)
    for name, label in volume.labels.items():
        stored = zarr.open_array(store_path / "a" / "labels" / name, mode="r")
        np.testing.assert_array_equal(stored[...], label)
        assert stored.dtype == label.dtype if name != "empty" else stored.dtype == np.uint8
    assert not (store_path / "a" / "labels" / "empty" / "c").exists()
    # zarr's own write of the same array: same values, and no stored chunk for the padding
    reference = zarr.create_array(
        tmp_path / "reference",
        data=volume.image,
        chunks=SMALL_CHUNKS,
        shards=image.shards,
        compressors=() if codec is None else (codec,),
        fill_value=HU_MIN,
    )
    np.testing.assert_array_equal(reference[...], image[...])
    assert _stored_chunks(tmp_path / "reference") == _stored_chunks(store_path / "a" / "image")
    assert 0 < _stored_chunks(store_path / "a" / "image") < np.prod(image.cdata_shape)


def _stored_chunks(array_dir) -> int:
    """Chunks present in a whole-array shard file (index at the end, CRC32C after it)."""
    array = zarr.open_array(array_dir, mode="r")
    n_entries = int(np.prod([s // c for s, c in zip(array.shards, array.chunks)]))
    raw = (array_dir / "c" / "0" / "0" / "0").read_bytes()[-(16 * n_entries + 4) : -4]
    offsets = np.frombuffer(raw, dtype="<u8")[::2]
    return int(np.count_nonzero(offsets != np.uint64(2**64 - 1)))


def test_unsharded_arrays_are_read_by_the_fast_reader_too(tmp_path):
    data = ct_like_volume().image
    array = zarr.create_array(tmp_path / "plain", data=data, chunks=(16, 16, 16), fill_value=HU_MIN)
    reader = ChunkReader.for_array(array, tmp_path / "plain")
    assert reader is not None
    np.testing.assert_array_equal(reader.read((3, 4, 5), (30, 40, 28)), data[3:30, 4:40, 5:28])


def test_layouts_the_fast_reader_does_not_know_fall_back_to_zarr(tmp_path):
    volume = ct_like_volume()
    store_path = tmp_path / "s.zarr"
    write_scan(store_path, "a", "p", volume, chunks=SMALL_CHUNKS, compressor=GzipCodec(level=1))
    store = VolumeStore(store_path)
    array = zarr.open_array(store_path / "a" / "image", mode="r")
    assert ChunkReader.for_array(array, store_path / "a" / "image") is None
    start, size = (-3, 10, 20), (10, 10, 15)
    np.testing.assert_array_equal(
        store.read_crop("a", start, size), padded_reference(volume.image, start, size, HU_MIN)
    )


def test_rewriting_a_scan_replaces_it_and_delete_removes_it(tmp_path):
    store_path = tmp_path / "s.zarr"
    write_scan(store_path, "a", "p", ct_like_volume(seed=1))
    second = ct_like_volume(shape=(10, 11, 12), seed=2)
    write_scan(store_path, "a", "p", second)
    store = VolumeStore(store_path)
    np.testing.assert_array_equal(store.read_volume("a"), second.image)
    assert [p.name for p in store_path.iterdir() if p.is_dir()] == ["a"]  # nothing left aside
    delete_scan(store_path, "a")
    assert list_complete_scans(store_path) == []


def test_volume_store_opens_a_root_a_store_or_a_list(tmp_path):
    for index, scan_id in enumerate(["a", "b"]):
        write_scan(tmp_path / shard_store_name(index), scan_id, "p", ct_like_volume((6, 6, 6)))
    (tmp_path / "shard_002.zarr.partial").mkdir()  # an unfinished shard is not opened
    assert VolumeStore(tmp_path).scan_ids == ["a", "b"]
    assert VolumeStore(tmp_path / "shard_001.zarr").scan_ids == ["b"]
    assert VolumeStore([tmp_path / "shard_000.zarr"]).scan_ids == ["a"]


def test_volume_store_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match="no such shard store"):
        VolumeStore(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no Zarr shard stores"):
        VolumeStore(tmp_path / "empty")
    for index in range(2):
        write_scan(tmp_path / shard_store_name(index), "same", "p", ct_like_volume((6, 6, 6)))
    with pytest.raises(InputError, match="'same' is also stored in"):
        VolumeStore(tmp_path)
    with pytest.raises(KeyError, match="unknown"):
        VolumeStore(tmp_path / "shard_000.zarr").read_crop("unknown", (0, 0, 0), (1, 1, 1))


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", ".hidden", "", "zarr.json", "x" * 129])
def test_unsafe_scan_ids_are_refused(tmp_path, bad_id):
    with pytest.raises(ValueError, match="letters, digits"):
        write_scan(tmp_path / "s.zarr", bad_id, "p", ct_like_volume((4, 4, 4)))


def test_unknown_compressor_name_is_refused():
    with pytest.raises(ValueError, match="unknown compressor 'lzma'"):
        make_compressor("lzma")


def _crop_sum_in_child(store: VolumeStore) -> int:
    return int(store.read_crop("scan-1", (-2, 3, 4), (20, 20, 20)).astype(np.int64).sum())


def test_volume_store_is_picklable_and_usable_in_worker_processes(stored):
    store, volume, _ = stored
    store.read_crop("scan-1", (0, 0, 0), (4, 4, 4))  # open handles in the parent first
    clone = pickle.loads(pickle.dumps(store))
    expected = int(
        padded_reference(volume.image, (-2, 3, 4), (20, 20, 20), HU_MIN).astype(np.int64).sum()
    )
    assert _crop_sum_in_child(clone) == expected
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            assert pool.apply(_crop_sum_in_child, (store,)) == expected
