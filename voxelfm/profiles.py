"""The repository's Snakemake profiles, installed where ``snakemake --profile NAME`` finds them.

Snakemake looks up a profile given by name (not path) in the user's configuration folder,
``$XDG_CONFIG_HOME/snakemake`` (``~/.config/snakemake``), then ``/etc/xdg/snakemake``.
``voxelfm install-profile slurm`` copies ``profiles/slurm`` there, so the README's
``snakemake --profile slurm`` is the literal command on a cluster.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import time
from pathlib import Path

from voxelfm.errors import VoxelFMError
from voxelfm.utils.atomic import atomic_directory


def profile_search_dir() -> Path:
    """Snakemake's per-user profile folder."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "snakemake"


def repository_profile(name: str) -> Path:
    """``profiles/NAME`` of the checkout: the current folder's, else the one this package
    was installed from (an editable install)."""
    if not name or "/" in name or name.startswith("."):
        raise VoxelFMError(f"profile name {name!r} must be a folder name under profiles/")
    candidates = [
        Path.cwd() / "profiles" / name,
        Path(__file__).resolve().parents[1] / "profiles" / name,
    ]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("config*.yaml")):
            return candidate
    raise VoxelFMError(
        f"no profile {name!r}: looked for a config*.yaml in {', '.join(map(str, candidates))}"
    )


def _same_tree(a: Path, b: Path) -> bool:
    comparison = filecmp.dircmp(a, b)
    if comparison.left_only or comparison.right_only or comparison.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, comparison.common_files, shallow=False)
    return (
        not mismatch
        and not errors
        and all(_same_tree(a / sub, b / sub) for sub in comparison.common_dirs)
    )


def install_profile(
    name: str, dest: str | os.PathLike | None = None, *, force: bool = False
) -> Path:
    """Copy ``profiles/NAME`` to ``DEST/NAME`` (default: Snakemake's per-user profile folder).

    An identical copy is left alone; a different one is kept (renamed ``NAME.bak-<time>``)
    only with ``force``, otherwise VoxelFMError says so.
    """
    source = repository_profile(name)
    target = Path(dest).expanduser() if dest else profile_search_dir()
    target = target / name
    if target.exists():
        if target.is_dir() and _same_tree(source, target):
            return target
        if not force:
            raise VoxelFMError(
                f"{target} exists and differs from {source}; pass --force to replace it "
                "(the old one is kept as a .bak folder)"
            )
        target.rename(target.with_name(f"{name}.bak-{time.strftime('%Y%m%d-%H%M%S')}"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return target
