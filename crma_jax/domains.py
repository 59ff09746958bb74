"""The three real text domains every Debian + Python machine has, with no download.

- legal: the license texts in `/usr/share/common-licenses`;
- code:  the Python standard library's own `.py` sources;
- docs:  the Python documentation topics in `pydoc_data.topics`.

Each builder returns documents in a fixed, sorted order, so runs are reproducible.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

LICENSES_DIR = Path("/usr/share/common-licenses")


def legal_documents(root: Path = LICENSES_DIR) -> list[str]:
    """One document per license file (symlinks to the same text are read once)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: license texts not found (the 'legal' domain needs Debian's base-files)")
    seen: set[Path] = set()
    docs = []
    for p in sorted(root.iterdir()):
        real = p.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        docs.append(real.read_text(encoding="utf-8", errors="replace"))
    return docs


def code_documents(max_files: int = 400) -> list[str]:
    """Python stdlib modules (top-level `.py` files of the stdlib directory), sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())[:max_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def docs_documents() -> list[str]:
    """The Python documentation topics shipped in `pydoc_data.topics`, sorted by topic."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


DOMAINS = {"legal": legal_documents, "code": code_documents, "docs": docs_documents}


def domain_documents(name: str) -> list[str]:
    """Documents of a built-in domain; raises ValueError naming the known ones."""
    if name not in DOMAINS:
        raise ValueError(f"unknown built-in domain {name!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[name]()
