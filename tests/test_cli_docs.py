"""The documents a new user reads: config/README.md explains every schema key; the LICENSE is
the one pyproject.toml names."""

from __future__ import annotations

import re

import yaml
from conftest import REPO_ROOT


def schema_keys(node: dict, path: str = "") -> list[str]:
    """Dotted paths of every property in the config schema (``<name>`` for open mappings)."""
    keys = []
    for name, child in node.get("properties", {}).items():
        dotted = f"{path}.{name}" if path else name
        keys.append(dotted)
        keys += schema_keys(child, dotted)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        keys += schema_keys(extra, f"{path}.<name>")
    return keys


def test_config_readme_explains_every_schema_key():
    schema = yaml.safe_load((REPO_ROOT / "workflow/schemas/config.schema.yaml").read_text())
    text = (REPO_ROOT / "config" / "README.md").read_text()
    documented = set(re.findall(r"`([^`]+)`", text))
    missing = []
    for dotted in schema_keys(schema):
        parts = dotted.split(".")
        named = [p for p in parts if p != "<name>"]
        # documented as `leaf`, `parent.leaf` or `parent.<name>.leaf` in its section's table
        spellings = {parts[-1], ".".join(named[-2:]), ".".join(parts[-3:])}
        if not spellings & documented:
            missing.append(dotted)
    assert not missing, f"config/README.md does not explain: {missing}"


def test_license_is_the_apache_2_text_pyproject_names():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = \{ text = "Apache-2.0" \}', pyproject, flags=re.MULTILINE)
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
