"""The ingestion summary: merged reports, counts, and a mosaic in radiological view."""

from __future__ import annotations

import json
import struct

import numpy as np
import pandas as pd

from voxelfm.ingest.summary import radiological_view, summarize
from voxelfm.store import shard_store_name, write_scan
from voxelfm.volume import CanonicalVolume


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_shard(tmp_path, index, scan_ids, failures):
    store = tmp_path / shard_store_name(index)
    for scan_id in scan_ids:
        image = np.full((20, 16, 12), -1024, np.int16)
        image[4:16, 3:13, 2:10] = 40
        write_scan(
            store, scan_id, f"patient_{scan_id[:2]}", CanonicalVolume(image, (1.5,) * 3, (0,) * 3)
        )
    qc = pd.DataFrame(
        {
            "scan_id": scan_ids,
            "patient_id": [f"patient_{s[:2]}" for s in scan_ids],
            "n_warnings": [0] * len(scan_ids),
        }
    )
    qc_csv = tmp_path / f"qc_{index}.csv"
    qc.to_csv(qc_csv, index=False)
    failures_csv = tmp_path / f"failures_{index}.csv"
    pd.DataFrame(failures, columns=["scan_id", "image", "error_type", "reason"]).to_csv(
        failures_csv, index=False
    )
    return store, qc_csv, failures_csv


def test_summary_counts_merged_reports_and_mosaic(tmp_path):
    shards = [
        write_shard(tmp_path, 0, ["aa1", "aa2"], [("x1", "/d/x1", "InputError", "truncated")]),
        write_shard(
            tmp_path,
            1,
            ["bb1"],
            [
                ("x2", "/d/x2", "InputError", "truncated"),
                ("x3", "/d/x3", "RuntimeError", "RuntimeError: boom"),
            ],
        ),
    ]
    stores, qcs, fails = (list(column) for column in zip(*shards))
    summary = summarize(stores, qcs, fails, tmp_path / "report")

    assert summary["scans_ok"] == 3 and summary["scans_failed"] == 3
    assert summary["patients_ok"] == 2
    assert summary["failures_by_reason"] == {"RuntimeError: boom": 1, "truncated": 2}
    assert summary["failures_by_error_type"] == {"InputError": 2, "RuntimeError": 1}
    assert summary["in_qc_but_not_stored"] == [] and summary["stored_but_not_in_qc"] == []
    assert json.loads((tmp_path / "report" / "summary.json").read_text()) == summary
    assert pd.read_csv(tmp_path / "report" / "qc.csv")["scan_id"].tolist() == ["aa1", "aa2", "bb1"]
    assert len(pd.read_csv(tmp_path / "report" / "failures.csv")) == 3
    # 3 scans -> one row of 3 cells, each an axial and a coronal 2-inch panel at 100 dpi,
    # plus 0.3 inch for the scan id and 0.5 inch for the legend.
    assert png_size(tmp_path / "report" / "mosaic.png") == (3 * 2 * 200, 230 + 50)


def test_summary_reports_disagreement_between_reports_and_stores(tmp_path):
    store, qc_csv, failures_csv = write_shard(tmp_path, 0, ["aa1"], [])
    pd.DataFrame({"scan_id": ["ghost"], "patient_id": ["p"]}).to_csv(qc_csv, index=False)
    summary = summarize([store], [qc_csv], [failures_csv], tmp_path / "report", mosaic_scans=0)
    assert summary["in_qc_but_not_stored"] == ["ghost"]
    assert summary["stored_but_not_in_qc"] == ["aa1"]
    assert png_size(tmp_path / "report" / "mosaic.png") == (400, 280)  # a placeholder


def test_radiological_view_puts_patient_right_left_and_anterior_up():
    plane = np.zeros((5, 4), int)  # axial (X toward patient's right, Y toward anterior)
    plane[4, 3] = 1  # the patient's right-anterior corner
    view = radiological_view(plane)
    assert view.shape == (4, 5)  # rows run along Y, columns along X
    assert view[0, 0] == 1  # top-left of the displayed image
