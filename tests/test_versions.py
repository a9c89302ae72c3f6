"""Every workflow rule carries the code version of its stage as a param, so bumping a
constant in voxelfm/versions.py reruns that stage (Snakemake reruns on a params change)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from voxelfm import conventions, versions
from voxelfm.datasets import ADAPTERS

RULES = Path(__file__).resolve().parents[1] / "workflow" / "rules"


def rule_blocks() -> dict[str, str]:
    """rule name -> its text, over every .smk file (a rule ends where the next top-level
    statement starts)."""
    blocks = {}
    for path in sorted(RULES.glob("*.smk")):
        for match in re.finditer(
            r"^rule (\w+):\n(.*?)(?=^\S|\Z)", path.read_text(), re.MULTILINE | re.DOTALL
        ):
            blocks[match.group(1)] = match.group(2)
    return blocks


def test_the_rule_parser_sees_the_workflow():
    blocks = rule_blocks()
    assert {"preprocess_shard", "pretrain", "embed", "probe", "probe_dense"} <= set(blocks)
    assert "voxelfm preprocess" in blocks["preprocess_shard"]


@pytest.mark.parametrize("rule", [r for r, text in rule_blocks().items() if "shell:" in text])
def test_every_rule_with_a_command_has_a_version_param(rule):
    text = rule_blocks()[rule]
    params = re.search(r"^    params:\n((?:        .*\n|\n)*)", text, re.MULTILINE)
    assert params, f"rule {rule} has no params (add version=versions.<STAGE>_VERSION)"
    version = re.search(r"^        version=(.*?)(?=^        \w+=|\Z)", params.group(1),
                        re.MULTILINE | re.DOTALL)  # fmt: skip
    assert version, f"rule {rule}: params lack version=versions.<STAGE>_VERSION"
    named = re.findall(r"versions\.(\w+)", version.group(1))
    assert named and all(hasattr(versions, name) for name in named), version.group(1)


def test_the_per_item_versions_cover_every_adapter():
    assert set(versions.ADAPTER_VERSIONS) == set(ADAPTERS)


def test_preprocessing_keeps_its_one_version():
    assert versions.PREPROCESSING_VERSION is conventions.PREPROCESSING_VERSION
