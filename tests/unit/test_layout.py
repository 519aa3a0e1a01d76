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
               | _package_folders(REPO_ROOT / "services", "streamscore.services") | {"streamscore.schemas"}
               | _package_folders(REPO_ROOT / "examples", "streamscore.examples"))
    assert listed == on_disk, (f"packages missing from pyproject: {sorted(on_disk - listed)}; "
                               f"listed but not on disk: {sorted(listed - on_disk)}")


def test_no_flat_modules_left_in_shared():
    """shared/ holds only the streamscore package: an import path leads to its file."""
    strays = sorted(p.name for p in (REPO_ROOT / "shared").iterdir() if p.name not in ("streamscore", "__pycache__"))
    assert not strays, f"shared/ should hold only streamscore/, found {strays}"


def test_the_readme_layout_table_is_the_tree():
    """Every path README's Repository layout table names exists, and every subpackage and top-level folder
    has a row: the table is the map a newcomer reads the tree by."""
    from streamscore.dev.readme_tables import first_code_span, first_table, readme_text

    documented = {first_code_span(cell).rstrip("/") for cell in first_table(readme_text(), "Repository layout").column("path")}
    missing_on_disk = sorted(p for p in documented if not (REPO_ROOT / p).exists())
    assert not missing_on_disk, f"README names paths that do not exist: {missing_on_disk}"
    subpackages = {f"shared/streamscore/{d.name}" for d in (REPO_ROOT / "shared" / "streamscore").iterdir()
                   if (d / "__init__.py").exists()}
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    folders = {line.split("/")[0] for line in tracked.splitlines() if "/" in line and not line.startswith(".")}
    folders -= {"shared", "deploy"}  # shared/ is documented by its subpackages; deploy/ with docker-compose
    undocumented = sorted((subpackages | folders | {"services/tools"}) - documented)
    assert not undocumented, f"README's layout table has no row for {undocumented}"


def test_the_package_root_holds_only_a_few_entry_modules():
    root = REPO_ROOT / "shared" / "streamscore"
    modules = sorted(p.name for p in root.glob("*.py"))
    assert modules == ["__init__.py", "settings.py"], modules


def test_test_modules_have_unique_basenames():
    """pytest imports test modules by basename (rootdir-relative, no __init__.py): two test_x.py in different
    folders break collection of the whole suite in a fresh checkout."""
    seen: dict[str, Path] = {}
    for path in sorted((REPO_ROOT / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path.relative_to(REPO_ROOT)} and {seen[path.name].relative_to(REPO_ROOT)}"
        seen[path.name] = path
