"""The tables the synthetic cohort writes, and their columns.

Its own module, with nothing heavy to import, because the Snakefile checks a config's label
columns against it at parse time (``voxelfm.config_checks``) while the generator
(``cohort``) writes exactly these columns.
"""

_IDS = ["scan_id", "patient_id"]
SCAN_TABLES = {
    "manifest.csv": [*_IDS, "image", "label_seg"],
    "labels.csv": [
        *_IDS,
        "finding",
        "target",
        "survival_time",
        "event",
        "lesion_x_mm",
        "lesion_y_mm",
        "lesion_z_mm",
        "n_lesions",
        "report",
        "split",
    ],
    "acquisitions.csv": [
        *_IDS,
        "format",
        "axcodes",
        "shape",
        "spacing_mm",
        "oblique_deg",
        "noise_sd_hu",
        "contrast_phase",
        "lesion_growth",
        "encoding",
    ],
}
