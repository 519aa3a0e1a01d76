"""The package tree is the architecture: pyproject installs exactly the folders there are."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _package_folders(root: Path, name: str) -> set[str]:
    return {name + "".join("." + part for part in init.parent.relative_to(root).parts)
            for init in root.rglob("__init__.py") if "__pycache__" not in init.parts}


def test_pyproject_lists_every_package_folder():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    on_disk = (_package_folders(REPO_ROOT / "shared" / "streamscore", "streamscore")
               | _package_folders(REPO_ROOT / "services", "streamscore.services") | {"streamscore.schemas"})
    assert listed == on_disk, (f"packages missing from pyproject: {sorted(on_disk - listed)}; "
                               f"listed but not on disk: {sorted(listed - on_disk)}")


def test_no_flat_modules_left_in_shared():
    """shared/ holds only the streamscore package: an import path leads to its file."""
    strays = sorted(p.name for p in (REPO_ROOT / "shared").iterdir() if p.name not in ("streamscore", "__pycache__"))
    assert not strays, f"shared/ should hold only streamscore/, found {strays}"
