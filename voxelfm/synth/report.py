"""Free-text radiology reports of synthetic scans, with varied wording.

A report states what the scan shows: each visible nodule with its size and lobe, each liver
lesion with its size and Couinaud segment, steatosis and hepatomegaly. Normal organs get one
of several "unremarkable" phrasings that never name a nodule or lesion, so the words
"nodule" and "lesion" appear exactly when there is one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from voxelfm.synth.outcomes import VisibleLesion

STEATOSIS_BELOW_HU = 40.0
HEPATOMEGALY_ABOVE_ML = 2200.0

# {a}: the article for the size ("a 6 mm", "an 8 mm"); sentences are capitalised afterwards.
_NODULE = (
    "{a} {size} mm solid nodule in the {where}.",
    "solid pulmonary nodule in the {where} measuring {size} mm.",
    "{where}: {size} mm solid nodule.",
    "there is {a} {size} mm noncalcified nodule in the {where}.",
)
_LIVER_LESION = (
    "{a} {size} mm hypodense lesion in hepatic {where}.",
    "hypoattenuating liver lesion in {where} measuring {size} mm.",
    "low-attenuation hepatic lesion, {where}, {size} mm.",
    "there is {a} {size} mm hypodense focal liver lesion in {where}.",
)
_CLEAR_LUNGS = (
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "The lung parenchyma is unremarkable.",
    "No focal abnormality in the lungs.",
)
_STEATOSIS = (
    "Diffuse hypoattenuation of the liver, consistent with hepatic steatosis.",
    "Fatty infiltration of the liver.",
    "Low hepatic attenuation in keeping with steatosis.",
)
_HEPATOMEGALY = ("The liver is enlarged.", "Hepatomegaly.", "Enlarged liver.")
_NORMAL_LIVER = (
    "The liver is normal in size and attenuation.",
    "Unremarkable liver.",
    "Normal appearance of the liver.",
)
_OTHER_ORGANS = (
    "Spleen and kidneys are unremarkable.",
    "The spleen and both kidneys appear normal.",
    "No abnormality of the spleen or kidneys.",
)
_NORMAL_IMPRESSION = (
    "No acute abnormality.",
    "No acute cardiopulmonary or abdominal abnormality.",
    "Normal study.",
    "Unremarkable examination.",
)


def write_report(
    rng: np.random.Generator,
    lesions: Sequence[VisibleLesion],
    *,
    liver_hu: float,
    liver_volume_ml: float,
) -> str:
    """A FINDINGS + IMPRESSION report of one scan (wording drawn with ``rng``)."""
    nodules = [v for v in lesions if v.lesion.kind == "lung_nodule"]
    liver_lesions = [v for v in lesions if v.lesion.kind == "liver_lesion"]
    steatosis = liver_hu < STEATOSIS_BELOW_HU
    hepatomegaly = liver_volume_ml > HEPATOMEGALY_ABOVE_ML

    def pick(options: Sequence[str]) -> str:
        return options[rng.integers(len(options))]

    findings = [_describe(pick(_NODULE), v) for v in nodules] or [pick(_CLEAR_LUNGS)]
    findings += [_describe(pick(_LIVER_LESION), v) for v in liver_lesions]
    if hepatomegaly:
        findings.append(pick(_HEPATOMEGALY))
    if steatosis:
        findings.append(pick(_STEATOSIS))
    if not (liver_lesions or hepatomegaly or steatosis):
        findings.append(pick(_NORMAL_LIVER))
    findings.append(pick(_OTHER_ORGANS))

    impression = []
    if nodules:
        impression.append(_summary(nodules, "pulmonary nodule", "in the "))
    if liver_lesions:
        impression.append(_summary(liver_lesions, "hepatic lesion", "in "))
    if hepatomegaly:
        impression.append("Hepatomegaly.")
    if steatosis:
        impression.append("Hepatic steatosis.")
    if not impression:
        impression.append(pick(_NORMAL_IMPRESSION))
    return f"FINDINGS: {' '.join(findings)} IMPRESSION: {' '.join(impression)}"


def _describe(template: str, visible: VisibleLesion) -> str:
    size = _mm(visible)
    sentence = template.format(a=_article(size), size=size, where=visible.lesion.location)
    return sentence[0].upper() + sentence[1:]


def _summary(lesions: Sequence[VisibleLesion], noun: str, preposition: str) -> str:
    """ "Pulmonary nodule, 9 mm, right upper lobe." or "2 hepatic lesions, largest 31 mm in ..."."""
    largest = max(lesions, key=lambda v: v.diameter_mm)
    if len(lesions) == 1:
        return f"{noun[0].upper() + noun[1:]}, {_mm(largest)} mm, {largest.lesion.location}."
    return (
        f"{len(lesions)} {noun}s, largest {_mm(largest)} mm {preposition}{largest.lesion.location}."
    )


def _mm(visible: VisibleLesion) -> int:
    return round(visible.diameter_mm)


def _article(size_mm: int) -> str:
    """English article before a spoken number: an 8, an 11, an 18, an 80-something."""
    return "an" if str(size_mm).startswith("8") or size_mm in (11, 18) else "a"
