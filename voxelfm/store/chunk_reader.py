"""Fast block reads from the Zarr arrays that ``write_scan`` produces.

zarr-python 3 schedules every chunk of a read through its asyncio loop and a thread pool,
which costs more than decoding the chunk itself for the ~300-1000 small chunks of a
pretraining crop set (see benchmarks/README.md: 7-10x slower per crop set than this path).
``ChunkReader`` reads the same bytes directly: it parses the array's own Zarr metadata,
opens the shard file once per call, reads the shard index, fetches the inner chunks the
blocks overlap in file order (one pread per run of adjacent chunks) and decodes each with
numcodecs (the library zarr itself decodes with) into one reused buffer, once per call
however many of the requested blocks overlap it (``read_many``: the crops of a multi-crop
sample share chunks); uncompressed chunks are used in place. It supports exactly the layouts zarr writes for a regular grid with the
default "/" chunk keys: plain chunks or one level of sharding, little-endian bytes, and at
most one Blosc or Zstd compressor. ``ChunkReader.for_array`` returns None for anything else,
and callers fall back to zarr's slicing.

Shard indexes are read on every call, not cached: a cache would go stale if a scan were
rewritten under a running reader, and one 8 KiB pread per call is cheap. The CRC32C of the
index is not verified (zarr does not verify it on partial reads either).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Sequence
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

# Decodes one stored chunk; returns the chunk (the given buffer, or a view of the bytes).
Decoder = Callable[[memoryview, np.ndarray], np.ndarray]

_EMPTY_OFFSET = 2**64 - 1  # shard-index marker of a chunk that was never written
_MAX_RUN_BYTES = 4 << 20  # longest run of adjacent chunks fetched with one pread
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
        return self.read_many([(lo, hi)])[0]

    def read_many(
        self, blocks: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]
    ) -> list[np.ndarray]:
        """The blocks ``[lo, hi)`` of ``blocks``, each inside the array, as new arrays.

        Every stored chunk is read and decoded once per call, however many of the blocks
        overlap it: the crops of one multi-crop sample overlap (the global crops each other,
        the local crops the global ones), and decoding is most of the cost of a read.
        """
        outs = [
            np.empty(tuple(h - l for l, h in zip(lo, hi)), dtype=self.dtype) for lo, hi in blocks
        ]
        # file index -> chunk index -> [(block number, chunk-local slices, block slices)]
        work: dict[tuple[int, ...], dict[tuple[int, ...], list]] = {}
        for block, (lo, hi) in enumerate(blocks):
            axis_pieces = [_pieces(l, h, n) for l, h, n in zip(lo, hi, self.chunk_shape)]
            for piece in itertools.product(*axis_pieces):
                chunk_index = tuple(i for i, _, _ in piece)
                file_index = tuple(i // n for i, n in zip(chunk_index, self._chunks_per_file))
                work.setdefault(file_index, {}).setdefault(chunk_index, []).append(
                    (block, tuple(src for _, src, _ in piece), tuple(dst for _, _, dst in piece))
                )
        buffer = np.empty(self.chunk_shape, dtype=self.dtype)
        for file_index, chunks in work.items():
            self._read_file(file_index, chunks, outs, buffer)
        return outs

    def _read_file(self, file_index, chunks, outs, buffer) -> None:
        """Decode the ``chunks`` of one file into the blocks that need them."""
        path = self.array_dir.joinpath("c", *map(str, file_index))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # zarr skips files that would only hold the fill value
            for targets in chunks.values():
                for block, _, dst in targets:
                    outs[block][dst] = self.fill_value
            return
        try:
            index = self._read_index(fd)
            if index is None:  # unsharded: the file is the chunk
                ((chunk_index, targets),) = chunks.items()
                self._scatter(self._decode(_read_all(fd), buffer), targets, outs)
                return
            # Read the stored bytes in file order, one pread per contiguous run of chunks.
            located = []
            for chunk_index, targets in chunks.items():
                local = tuple(i % n for i, n in zip(chunk_index, self._chunks_per_file))
                offset, nbytes = (int(v) for v in index[local])
                if offset == _EMPTY_OFFSET:
                    for block, _, dst in targets:
                        outs[block][dst] = self.fill_value
                else:
                    located.append((offset, nbytes, targets))
            located.sort(key=lambda entry: entry[0])
            run_start = 0
            while run_start < len(located):
                run_stop = run_start + 1
                while (
                    run_stop < len(located)
                    and located[run_stop][0] == located[run_stop - 1][0] + located[run_stop - 1][1]
                    and located[run_stop][0] - located[run_start][0] < _MAX_RUN_BYTES
                ):
                    run_stop += 1
                first = located[run_start][0]
                last_offset, last_nbytes, _ = located[run_stop - 1]
                data = memoryview(os.pread(fd, last_offset + last_nbytes - first, first))
                for offset, nbytes, targets in located[run_start:run_stop]:
                    chunk = self._decode(data[offset - first : offset - first + nbytes], buffer)
                    self._scatter(chunk, targets, outs)
                run_start = run_stop
        finally:
            os.close(fd)

    @staticmethod
    def _scatter(chunk: np.ndarray, targets: list, outs: list[np.ndarray]) -> None:
        for block, src, dst in targets:
            outs[block][dst] = chunk[src]

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
        return _raw_view
    if len(compressors) == 1 and isinstance(compressors[0], BloscCodec):
        return _into_buffer(numcodecs.blosc.decompress)  # Blosc frames are self-describing
    if len(compressors) == 1 and isinstance(compressors[0], ZstdCodec):
        return _into_buffer(numcodecs.zstd.decompress)
    return None


def _into_buffer(decompress: Callable[[memoryview, np.ndarray], None]) -> Decoder:
    def decode(data: memoryview, buffer: np.ndarray) -> np.ndarray:
        decompress(data, buffer)
        return buffer

    return decode


def _raw_view(data: memoryview, buffer: np.ndarray) -> np.ndarray:
    """Uncompressed chunks are used in place: no copy into the buffer."""
    if len(data) != buffer.nbytes:
        raise ValueError(f"stored chunk holds {len(data)} bytes, expected {buffer.nbytes}")
    return np.frombuffer(data, dtype=buffer.dtype).reshape(buffer.shape)


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
