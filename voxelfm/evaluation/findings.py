"""Rule-based findings of a free-text CT report, and finding-level precision / recall / F1.

The clinical accuracy of a generated report is judged the way the CT-RATE paper does: the
same extractor reads the generated and the reference report, and the two sets of positive
findings are compared (abnormality precision, recall and F1).

Vocabulary (:data:`FINDINGS`): the synthetic cohort's findings (lung nodule, liver lesion,
hepatic steatosis, hepatomegaly; ``voxelfm.synth.report``) and the 18 CT-RATE abnormality
labels, each with a few synonyms (regular expressions on the lower-cased text).

Negation follows NegEx (Chapman et al. 2001) in a reduced form. The report is cut into
clauses at sentence punctuation (``. ; : ?`` and line breaks) and at contrast words (but,
however, although, except, ...). A mention is negated when a negation cue ("no", "without",
"not", "negative for", "free of", "absence of", "no evidence of", ...) appears in its clause
before the end of the mention, or a post-negation ("... is absent", "... not seen",
"... resolved") follows it in the clause. Cues carry over commas, so "no effusion,
consolidation or nodule" negates all three. A finding is positive when any of its mentions is
not negated. Phrases that state normality without naming a finding ("the lungs are clear",
"unremarkable liver") simply yield no positive finding. Uncertain mentions ("possible
nodule") count as positive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Canonical finding name -> synonyms (regular expressions, matched on lower-cased text).
FINDINGS: dict[str, tuple[str, ...]] = {
    # Synthetic cohort (the CT-RATE "Lung nodule" label is the same finding).
    "Lung nodule": (
        r"(?<!thyroid )(?<!adrenal )(?<!renal )(?<!hepatic )(?<!liver )nodules?\b",
        r"\bpulmonary mass(es)?\b",
        r"\blung mass(es)?\b",
    ),
    "Liver lesion": (
        r"\b(liver|hepatic)\b[\w\s-]{0,40}?\b(lesions?|mass(es)?|metastas[ie]s|cysts?|nodules?)\b",
        r"\b(lesions?|mass(es)?|metastas[ie]s|cysts?)\b[\w\s-]{0,30}?\b(liver|hepatic)\b",
        r"\bhepatic (lesion|mass|metastas[ie]s|cyst)",
    ),
    "Hepatic steatosis": (
        r"\bsteatosis\b",
        r"\bfatty (infiltration|liver|change)",
        r"\bhepatic steatosis\b",
        r"\bfatty infiltration of the liver\b",
    ),
    "Hepatomegaly": (
        r"\bhepatomegaly\b",
        r"\benlarged liver\b",
        r"\bliver (is |appears |was )?(\w+ )?enlarged\b",
        r"\benlargement of the liver\b",
    ),
    # CT-RATE abnormality labels.
    "Medical material": (
        r"\bpacemakers?\b",
        r"\bstents?\b",
        r"\bcatheters?\b",
        r"\bport-a-cath\b",
        r"\b(chemo|central venous|venous access) ports?\b",
        r"\bsternotomy( wires?)?\b",
        r"\bsurgical (clips?|material)\b",
        r"\bprosthe(sis|ses|tic)\b",
        r"\b(endotracheal|nasogastric|chest|tracheostomy) tubes?\b",
        r"\bimplantable (cardioverter|device)",
        r"\b(medical|foreign) (material|body|bodies)\b",
    ),
    "Arterial wall calcification": (
        r"\b(arterial|aortic|vascular|atherosclerotic)( wall)? calcifications?\b",
        r"\bcalcified (atheroma|plaques?|atherosclerotic)\b",
        r"\bcalcific atherosclero",
        r"(?<!coronary )\batherosclero(sis|tic changes?)\b",
        r"\b(aorta|aortic wall) (is |shows )?calcified\b",
    ),
    "Cardiomegaly": (
        r"\bcardiomegaly\b",
        r"\benlarged (heart|cardiac silhouette)\b",
        r"\bheart (is |appears )?(\w+ )?enlarged\b",
        r"\bcardiac enlargement\b",
    ),
    "Pericardial effusion": (
        r"\bpericardial (effusion|fluid)\b",
        r"\bhemopericardium\b",
        r"\bhaemopericardium\b",
    ),
    "Coronary artery wall calcification": (
        r"\bcoronary (artery |arterial )?(wall )?calcifications?\b",
        r"\bcalcified coronar(y|ies)\b",
        r"\bcoronary (atherosclerosis|calcium|plaques?)\b",
        r"\bcalcific coronary\b",
    ),
    "Hiatal hernia": (
        r"\bhiatal hernia\b",
        r"\bhiatus hernia\b",
        r"\bhiatal herniation\b",
    ),
    "Lymphadenopathy": (
        r"\blymphadenopathy\b",
        r"\badenopathy\b",
        r"\benlarged (\w+ ){0,2}(lymph )?nodes?\b",
        r"\blymph node enlargement\b",
        r"\bpathologic(al)?(ly)? (enlarged |sized )?(lymph )?nodes?\b",
    ),
    "Emphysema": (
        r"\bemphysema\b",
        r"\bemphysematous\b",
        r"\bbullae\b",
        r"\bbullous\b",
    ),
    "Atelectasis": (
        r"\batelecta(sis|ses|tic)\b",
        r"\b(subsegmental|segmental|lobar) collapse\b",
    ),
    "Lung opacity": (
        r"\bopacit(y|ies)\b",
        r"\bground[- ]glass\b",
        r"\bggos?\b",
        r"\bopacification\b",
    ),
    "Pulmonary fibrotic sequela": (
        r"\bfibro(sis|tic)\b",
        r"\bfibrotic (sequelae?|changes?|bands?)\b",
        r"\b(parenchymal |pulmonary )?scarring\b",
        r"\bhoneycombing\b",
    ),
    "Pleural effusion": (
        r"\bpleural (effusions?|fluid)\b",
        r"(?<!pericardial )\beffusions?\b",
        r"\bhydrothorax\b",
    ),
    "Mosaic attenuation pattern": (
        r"\bmosaic (attenuation|perfusion|pattern)\b",
        r"\bmosaic\b",
    ),
    "Peribronchial thickening": (
        r"\bperibronchial (wall )?thickening\b",
        r"\bbronchial wall thickening\b",
        r"\bperibronchial cuffing\b",
        r"\bthickened bronchial walls?\b",
    ),
    "Consolidation": (
        r"\bconsolidations?\b",
        r"\bconsolidative\b",
        r"\bair[- ]?space (disease|opacit(y|ies))\b",
    ),
    "Bronchiectasis": (r"\bbronchiecta(sis|ses|tic)\b",),
    "Interlobular septal thickening": (
        r"\b(interlobular )?septal thickening\b",
        r"\bthickened (interlobular )?septa\b",
        r"\bkerley b\b",
    ),
}
FINDING_NAMES: tuple[str, ...] = tuple(FINDINGS)

# Sentence punctuation and contrast words end the scope of a negation cue.
_CLAUSE_BREAK = re.compile(
    r"\.(?!\d)|[;:?!\n]|\b(but|however|although|though|except|apart from|aside from|whereas|"
    r"other than|with the exception of)\b"
)
_NEGATION_BEFORE = re.compile(
    r"\b(no|not|without|negative for|free of|absence of|absent|nor|neither|"
    r"no evidence of|no signs? of|rule[sd]? out|ruled out|resolution of|resolved)\b"
)
_NEGATION_AFTER = re.compile(
    r"^[\w\s,-]{0,30}?\b(is|are|was|were|has|have)?\s*(absent|not (seen|identified|present|"
    r"demonstrated|visualized|visualised)|resolved|excluded|ruled out|no longer (seen|present))\b"
)
# Phrases that contain a cue word but negate nothing ("no change in the nodule").
_PSEUDO_NEGATION = re.compile(
    r"\b(no|without) (significant |interval |substantial )?(change|increase|decrease|growth|"
    r"progression)\b|\bnot only\b|\bno longer enlarging\b"
)
_COMPILED = {
    name: tuple(re.compile(pattern) for pattern in patterns) for name, patterns in FINDINGS.items()
}


@dataclass(frozen=True)
class Mention:
    """One match of a finding's synonym: its text, character span and whether it is negated."""

    finding: str
    text: str
    start: int
    end: int
    negated: bool


def clauses(text: str) -> list[tuple[int, str]]:
    """(offset, clause) pieces of the lower-cased report between clause breaks."""
    text = str(text).lower()
    pieces, start = [], 0
    for match in _CLAUSE_BREAK.finditer(text):
        pieces.append((start, text[start : match.start()]))
        start = match.end()
    pieces.append((start, text[start:]))
    return [(offset, clause) for offset, clause in pieces if clause.strip()]


def find_mentions(
    text: str, vocabulary: Mapping[str, Sequence[str]] | None = None
) -> list[Mention]:
    """Every synonym match in the report with its negation status, in reading order."""
    compiled = (
        _COMPILED
        if vocabulary is None
        else {name: tuple(map(re.compile, patterns)) for name, patterns in vocabulary.items()}
    )
    mentions = []
    for offset, clause in clauses(text):
        for name, patterns in compiled.items():
            for pattern in patterns:
                for match in pattern.finditer(clause):
                    before = _PSEUDO_NEGATION.sub(" ", clause[: match.end()])
                    negated = bool(
                        _NEGATION_BEFORE.search(before)
                        or _NEGATION_AFTER.search(clause[match.end() :])
                    )
                    mentions.append(
                        Mention(
                            name,
                            match.group(0),
                            offset + match.start(),
                            offset + match.end(),
                            negated,
                        )
                    )
    return sorted(mentions, key=lambda m: (m.start, m.finding))


def finding_status(text: str) -> dict[str, bool]:
    """finding -> True (stated present) or False (only mentioned negated); unmentioned absent."""
    status: dict[str, bool] = {}
    for mention in find_mentions(text):
        status[mention.finding] = status.get(mention.finding, False) or not mention.negated
    return status


def extract_findings(text: str) -> frozenset[str]:
    """The findings a report states as present (negated and unmentioned ones are absent)."""
    return frozenset(name for name, present in finding_status(text).items() if present)


def findings_matrix(texts: Iterable[str], vocabulary: Sequence[str] = FINDING_NAMES) -> np.ndarray:
    """(n, K) 0/1 matrix: report i states finding ``vocabulary[k]`` as present."""
    rows = [extract_findings(text) for text in texts]
    return np.array([[name in row for name in vocabulary] for row in rows], dtype=np.int8).reshape(
        len(rows), len(vocabulary)
    )


@dataclass(frozen=True)
class FindingScores:
    """Finding-level agreement of generated with reference reports."""

    precision: float
    recall: float
    f1: float
    f1_macro: float


def finding_scores(
    reference: np.ndarray, generated: np.ndarray, labels: Sequence[int] | None = None
) -> FindingScores:
    """Micro precision / recall / F1 over all (report, finding) pairs, and macro F1.

    Args:
        reference, generated: (n, K) 0/1 findings of the reference and generated reports.
        labels: finding columns the macro average runs over (default: every column positive
            in either matrix). A column with no positive in either matrix has no F1 and is left
            out of the average, as sklearn's ``zero_division=np.nan``.

    Micro precision is 0 when nothing is generated as positive, micro recall 0 when no
    reference finding exists (sklearn's ``zero_division=0``); both 0 give F1 0.
    """
    reference = np.asarray(reference, dtype=bool)
    generated = np.asarray(generated, dtype=bool)
    if reference.shape != generated.shape or reference.ndim != 2:
        raise ValueError(f"findings matrices differ: {reference.shape} vs {generated.shape}")
    tp = (reference & generated).sum(axis=0)  # (K,)
    fp = (~reference & generated).sum(axis=0)
    fn = (reference & ~generated).sum(axis=0)
    precision = _ratio(tp.sum(), tp.sum() + fp.sum())
    recall = _ratio(tp.sum(), tp.sum() + fn.sum())
    f1 = _ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    columns = np.arange(reference.shape[1]) if labels is None else np.asarray(labels, dtype=int)
    denominators = (2 * tp + fp + fn)[columns]
    defined = denominators > 0
    f1_macro = (
        float(np.mean(2 * tp[columns][defined] / denominators[defined]))
        if defined.any()
        else float("nan")
    )
    return FindingScores(precision, recall, f1, f1_macro)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else 0.0
