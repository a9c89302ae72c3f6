"""Chunk shape and compressor of stored volumes, and the names used to pick others.

The defaults were chosen by ``benchmarks/bench_crop_reads.py --sweep`` (table in
``benchmarks/README.md``) for the pretraining access pattern, random 112^3 and 56^3 crops:

- 32^3 chunks: a crop decodes ~2x its own size (64^3: ~4x; 128^3: ~10x), and inside one
  Zarr shard file per array the extra chunks cost one pread each, not one file each.
  Read time per crop set: 32^3 16-22 ms, 64^3 23-27 ms, 128^3 53 ms (Blosc-LZ4).
- Blosc-LZ4 with byte shuffle: decodes 2-3x faster than any Zstd variant (22 vs 42-48 ms
  per crop set) for 2.2x compression on real CT, against 2.2-2.9x for Zstd. Reads are what
  pretraining repeats millions of times; the ~25% extra storage is the price.
- Uncompressed reads ~1.8x faster still (8-12 ms per set with ``read_crops``: 10-12x a
  whole-volume torch.load, against 6-7x for Blosc-LZ4) at 2.2x the storage:
  ``make_compressor("none")``. Worth it only when the cohort fits in the page cache; the
  default stays compressed (benchmarks/README.md, "Crop sets").
"""

from __future__ import annotations

from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, ZstdCodec

DEFAULT_CHUNKS: tuple[int, int, int] = (32, 32, 32)
DEFAULT_COMPRESSOR_NAME = "blosc-lz4-shuffle-5"

_BLOSC_SHUFFLES = {"noshuffle", "shuffle", "bitshuffle"}
_BLOSC_CNAMES = {"lz4", "lz4hc", "zstd", "zlib", "blosclz"}

COMPRESSOR_NAME_RULE = (
    "expected 'none', 'zstd-<level>' or 'blosc-<lz4|lz4hc|zstd|zlib|blosclz>-"
    "<noshuffle|shuffle|bitshuffle>-<level>'"
)


def whole_volume_shard(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    """Shard shape holding the whole array: ``shape`` rounded up to whole chunks."""
    return tuple(-(-n // c) * c for n, c in zip(shape, chunks))


def make_compressor(name: str) -> BytesBytesCodec | None:
    """The Zarr codec named ``name`` (None for 'none'); raises ValueError on unknown names."""
    parts = name.lower().split("-")
    try:
        if parts == ["none"]:
            return None
        if len(parts) == 2 and parts[0] == "zstd":
            return ZstdCodec(level=int(parts[1]))
        if (
            len(parts) == 4
            and parts[0] == "blosc"
            and parts[1] in _BLOSC_CNAMES
            and parts[2] in _BLOSC_SHUFFLES
        ):
            return BloscCodec(cname=parts[1], shuffle=parts[2], clevel=int(parts[3]))
    except ValueError:
        pass
    raise ValueError(f"unknown compressor {name!r}: {COMPRESSOR_NAME_RULE}")


DEFAULT_COMPRESSOR: BytesBytesCodec | None = make_compressor(DEFAULT_COMPRESSOR_NAME)
