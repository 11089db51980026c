"""What the distribution ships: every package on disk, and the examples as ``sagas.examples``."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_on_disk_is_shipped() -> None:
    """The explicit package list names each folder of sagas/ and transport/ that has an __init__.py."""
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("sagas", "transport")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(SETUPTOOLS["packages"]) == on_disk | {"sagas.examples"}


def test_the_examples_ship_as_sagas_examples() -> None:
    """sagas.examples is the examples folder itself, not a copy of it."""
    assert SETUPTOOLS["package-dir"] == {"sagas.examples": "examples"}
    assert (ROOT / "examples" / "__init__.py").is_file()
    assert not (ROOT / "sagas" / "examples").exists()
