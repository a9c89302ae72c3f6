"""Chunk shape and compressor of stored volumes, and the names used to pick others.

The defaults were chosen by ``benchmarks/bench_crop_reads.py --sweep`` (table in
``benchmarks/README.md``): see the comment on ``DEFAULT_CHUNKS``.
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
