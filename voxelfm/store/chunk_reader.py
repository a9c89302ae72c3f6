"""Fast block reads from the Zarr arrays that ``write_scan`` produces.

zarr-python 3 schedules every chunk of a read through its asyncio loop and a thread pool,
which costs more than decoding the chunk itself for the ~100-400 small chunks of a
pretraining crop set (see benchmarks/README.md: 2-3x slower per crop set than this path).
``ChunkReader`` reads the same bytes directly: it parses the array's own Zarr metadata,
opens the shard file once per crop, reads the shard index, and decodes only the inner
chunks the block overlaps with numcodecs (the library zarr itself decodes with) into a
reused buffer. It supports exactly the layouts zarr writes for a regular grid with the
default "/" chunk keys: plain chunks or one level of sharding, little-endian bytes, and at
most one Blosc or Zstd compressor. ``ChunkReader.for_array`` returns None for anything else,
and callers fall back to zarr's slicing.

Shard indexes are read on every call, not cached: a cache would go stale if a scan were
rewritten under a running reader, and one 8 KiB pread per crop is cheap. The CRC32C of the
index is not verified (zarr does not verify it on partial reads either).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numcodecs.blosc
import numcodecs.zstd
import numpy as np
import zarr
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    ShardingCodec,
    ShardingCodecIndexLocation,
    ZstdCodec,
)
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

Decoder = Callable[[bytes, np.ndarray], None]

_EMPTY_CHUNK = np.uint64(2**64 - 1)  # shard-index marker of a chunk that was never written
_INDEX_ENTRY_BYTES = 16  # (offset, nbytes) as two little-endian uint64
_CRC32C_BYTES = 4


class ChunkReader:
    """Reads rectangular blocks of one Zarr v3 array stored in a local directory."""

    def __init__(
        self,
        array_dir: Path,
        dtype: np.dtype,
        fill_value: int,
        file_shape: tuple[int, ...],
        chunk_shape: tuple[int, ...],
        decode: Decoder,
        index_location: ShardingCodecIndexLocation | None,
        index_has_crc: bool,
    ):
        self.array_dir = array_dir
        self.dtype = dtype
        self.fill_value = fill_value
        self.file_shape = file_shape  # shard shape, or chunk shape when not sharded
        self.chunk_shape = chunk_shape  # inner chunk shape
        self._decode = decode
        self._index_location = index_location  # None: not sharded, one chunk per file
        self._chunks_per_file = tuple(f // c for f, c in zip(file_shape, chunk_shape))
        n_chunks = int(np.prod(self._chunks_per_file))
        self._index_bytes = n_chunks * _INDEX_ENTRY_BYTES + (_CRC32C_BYTES if index_has_crc else 0)

    @classmethod
    def for_array(cls, array: zarr.Array, array_dir: Path) -> ChunkReader | None:
        """A reader for ``array`` stored under ``array_dir``, or None if its layout is not
        one this reader handles."""
        meta = array.metadata
        if getattr(meta, "zarr_format", None) != 3:
            return None
        if not isinstance(meta.chunk_grid, RegularChunkGrid):
            return None
        if not isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding):
            return None
        if meta.chunk_key_encoding.separator != "/":
            return None
        dtype = np.dtype(array.dtype)
        file_shape = tuple(meta.chunk_grid.chunk_shape)
        codecs = tuple(meta.codecs)
        index_location, index_has_crc = None, False
        chunk_shape = file_shape
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sharding = codecs[0]
            index_codecs = tuple(sharding.index_codecs)
            if not _is_little_endian_bytes(index_codecs[0], np.dtype("<u8")):
                return None
            if index_codecs[1:] not in ((), (Crc32cCodec(),)):
                return None
            index_location = sharding.index_location
            index_has_crc = len(index_codecs) == 2
            chunk_shape = tuple(sharding.chunk_shape)
            codecs = tuple(sharding.codecs)
        if not codecs or not _is_little_endian_bytes(codecs[0], dtype):
            return None
        decode = _decoder(codecs[1:])
        if decode is None:
            return None
        return cls(
            array_dir,
            dtype,
            meta.fill_value.item() if hasattr(meta.fill_value, "item") else meta.fill_value,
            file_shape,
            chunk_shape,
            decode,
            index_location,
            index_has_crc,
        )

    def read(self, lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
        """The block ``[lo, hi)``, which must lie inside the array."""
        out = np.empty(tuple(h - l for l, h in zip(lo, hi)), dtype=self.dtype)
        buffer = np.empty(self.chunk_shape, dtype=self.dtype)
        file_pieces = [_pieces(l, h, n) for l, h, n in zip(lo, hi, self.file_shape)]
        for file_piece in itertools.product(*file_pieces):
            file_index = tuple(index for index, _, _ in file_piece)
            # Block bounds clipped to this file, in array coordinates.
            file_lo = [l + dst.start for l, (_, _, dst) in zip(lo, file_piece)]
            file_hi = [l + dst.stop for l, (_, _, dst) in zip(lo, file_piece)]
            self._read_file(file_index, file_lo, file_hi, lo, out, buffer)
        return out

    def _read_file(self, file_index, file_lo, file_hi, lo, out, buffer) -> None:
        """Fill the part ``[file_lo, file_hi)`` of the block starting at ``lo`` from one file."""
        chunk_pieces = [
            [
                (i, src, slice(dst.start + fl - l, dst.stop + fl - l))
                for i, src, dst in _pieces(fl, fh, n)
            ]
            for fl, fh, l, n in zip(file_lo, file_hi, lo, self.chunk_shape)
        ]
        path = self.array_dir.joinpath("c", *map(str, file_index))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # zarr skips files that would only hold the fill value
            out[tuple(slice(fl - l, fh - l) for fl, fh, l in zip(file_lo, file_hi, lo))] = (
                self.fill_value
            )
            return
        try:
            index = self._read_index(fd)
            for piece in itertools.product(*chunk_pieces):
                chunk_index = tuple(i for i, _, _ in piece)
                destination = tuple(dst for _, _, dst in piece)
                if index is None:
                    data = _read_all(fd)
                else:
                    local = tuple(i % n for i, n in zip(chunk_index, self._chunks_per_file))
                    offset, nbytes = index[local]
                    if offset == _EMPTY_CHUNK:
                        out[destination] = self.fill_value
                        continue
                    data = os.pread(fd, int(nbytes), int(offset))
                self._decode(data, buffer)
                out[destination] = buffer[tuple(src for _, src, _ in piece)]
        finally:
            os.close(fd)

    def _read_index(self, fd: int) -> np.ndarray | None:
        if self._index_location is None:
            return None
        if self._index_location == ShardingCodecIndexLocation.end:
            offset = os.fstat(fd).st_size - self._index_bytes
        else:
            offset = 0
        raw = os.pread(fd, self._index_bytes, offset)
        entries = np.frombuffer(raw, dtype="<u8", count=2 * int(np.prod(self._chunks_per_file)))
        return entries.reshape(*self._chunks_per_file, 2)


def _is_little_endian_bytes(codec: object, dtype: np.dtype) -> bool:
    if not isinstance(codec, BytesCodec):
        return False
    if dtype.itemsize == 1:
        return True
    return sys.byteorder == "little" and codec.endian is not None and codec.endian.value == "little"


def _decoder(compressors: tuple) -> Decoder | None:
    if compressors == ():
        return _copy_raw
    if len(compressors) == 1 and isinstance(compressors[0], BloscCodec):
        return numcodecs.blosc.decompress  # Blosc frames are self-describing
    if len(compressors) == 1 and isinstance(compressors[0], ZstdCodec):
        return numcodecs.zstd.decompress
    return None


def _copy_raw(data: bytes, buffer: np.ndarray) -> None:
    buffer.reshape(-1)[...] = np.frombuffer(data, dtype=buffer.dtype)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)


def _pieces(lo: int, hi: int, cell: int) -> list[tuple[int, slice, slice]]:
    """Split ``[lo, hi)`` along one axis by cells of size ``cell``: for each overlapped cell,
    its index, the overlap in cell coordinates, and the overlap relative to ``lo``."""
    pieces = []
    for index in range(lo // cell, (hi - 1) // cell + 1):
        start, stop = max(lo, index * cell), min(hi, (index + 1) * cell)
        pieces.append(
            (index, slice(start - index * cell, stop - index * cell), slice(start - lo, stop - lo))
        )
    return pieces
