"""The repo's map (ARCHITECTURE.md) names only paths that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_path_the_architecture_map_names_exists():
    text = (REPO / "ARCHITECTURE.md").read_text()
    paths = set(re.findall(r"`((?:crma_jax|train|convert|tests)/[\w./]*)`", text))
    assert len(paths) > 30  # the map names the modules, not a handful of them
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing
    # Every library module has its row in the table.
    modules = {f"crma_jax/{p.name}" for p in (REPO / "crma_jax").glob("*.py") if p.name != "__init__.py"}
    assert modules <= paths, sorted(modules - paths)


def test_nothing_in_the_repo_refers_to_the_design_card_it_does_not_hold():
    sources = [*REPO.glob("*.md"), *(p for d in ("crma_jax", "train", "convert", "tests") for p in (REPO / d).rglob("*.py"))]
    offenders = [str(p.relative_to(REPO)) for p in sources if "DESIGN" + ".md" in p.read_text()]
    assert not offenders
