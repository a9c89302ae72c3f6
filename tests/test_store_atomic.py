"""A scan write that dies part-way leaves nothing a reader or a rerun takes as complete."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from voxelfm.store import VolumeStore, list_complete_scans, remove_partial_scans, write_scan, writer
from voxelfm.store.layout import list_partial_scans
from voxelfm.volume import CanonicalVolume


def small_volume() -> CanonicalVolume:
    image = np.arange(20 * 21 * 22, dtype=np.int16).reshape(20, 21, 22)
    return CanonicalVolume(
        image, (1.5,) * 3, (0.0,) * 3, labels={"seg": (image % 3).astype(np.uint8)}
    )


# The child writes one complete scan, then is SIGKILLed inside the second write at the
# given point: after all arrays are on disk but before the commit rename, or between the
# image and the labels.
_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from voxelfm.store import writer
    from voxelfm.volume import CanonicalVolume

    store, point = sys.argv[1], sys.argv[2]
    image = np.arange(20 * 21 * 22, dtype=np.int16).reshape(20, 21, 22)
    volume = CanonicalVolume(image, (1.5,) * 3, (0.0,) * 3, labels={"seg": (image % 3).astype(np.uint8)})
    writer.write_scan(store, "done", "p", volume)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(writer, point, die)
    writer.write_scan(store, "killed", "p", volume)
    """
)


@pytest.mark.parametrize("kill_point", ["_commit", "_as_label_dtype"])
def test_sigkill_mid_write_leaves_no_listed_scan_and_a_rerun_completes_it(tmp_path, kill_point):
    store_path = tmp_path / "shard_000.zarr"
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(store_path), kill_point],
        capture_output=True,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert list_partial_scans(store_path), "the kill should have left a partial write behind"
    assert VolumeStore(store_path).scan_ids == ["done"]

    write_scan(store_path, "killed", "p", small_volume())  # the rerun
    assert remove_partial_scans(store_path) == 1
    store = VolumeStore(store_path)
    assert store.scan_ids == ["done", "killed"]
    np.testing.assert_array_equal(store.read_volume("killed"), small_volume().image)
    assert list_partial_scans(store_path) == []


def test_an_exception_mid_write_cleans_up_and_keeps_the_previous_version(tmp_path, monkeypatch):
    store_path = tmp_path / "s.zarr"
    write_scan(store_path, "a", "p", small_volume())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "_as_label_dtype", fail)
    changed = CanonicalVolume(
        small_volume().image + 1,
        (1.5,) * 3,
        (0.0,) * 3,
        labels={"seg": small_volume().labels["seg"]},
    )
    with pytest.raises(OSError, match="disk full"):
        write_scan(store_path, "a", "p", changed)
    assert list_partial_scans(store_path) == []
    assert list_complete_scans(store_path) == ["a"]
    np.testing.assert_array_equal(VolumeStore(store_path).read_volume("a"), small_volume().image)
