"""Five real text domains every Debian + Python machine has, with no download.

- legal:     the license texts in `/usr/share/common-licenses`;
- code:      the Python standard library's own `.py` sources;
- docs:      the Python documentation topics in `pydoc_data.topics`;
- changelog: Debian package changelogs, `/usr/share/doc/*/changelog.Debian.gz`;
- shell:     the shell scripts among `/usr/bin`'s programs.

Each builder returns documents in a fixed, sorted order, so runs are reproducible.
`domain_documents` cuts them into passages of at most `PASSAGE_CHARS` at blank lines, so that
even the domains with few, long files (14 licenses) have a holdout of many distinct passages.
"""

from __future__ import annotations

import gzip
import sysconfig
from pathlib import Path

LICENSES_DIR = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")
BIN_DIR = Path("/usr/bin")
PASSAGE_CHARS = 1200


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


def changelog_documents(root: Path = DOC_DIR) -> list[str]:
    """One document per installed package's Debian changelog, sorted by package name."""
    files = sorted(root.glob("*/changelog.Debian.gz"))
    if not files:
        raise FileNotFoundError(f"{root}/*/changelog.Debian.gz: no Debian changelogs found "
                                "(the 'changelog' domain needs /usr/share/doc, which some slim images strip)")
    return [gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace") for p in files]


def shell_documents(root: Path = BIN_DIR) -> list[str]:
    """The programs in `root` that are shell scripts (a `#!` line naming sh or bash), sorted."""
    docs = []
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.is_symlink():
            with p.open("rb") as f:
                first = f.readline(200)
            if first.startswith(b"#!") and (first.rstrip().endswith((b"/sh", b"/bash", b" sh", b" bash"))):
                docs.append(p.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise FileNotFoundError(f"{root}: no shell scripts found (the 'shell' domain)")
    return docs


DOMAINS = {"legal": legal_documents, "code": code_documents, "docs": docs_documents,
           "changelog": changelog_documents, "shell": shell_documents}


def passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """`text` cut at blank lines into passages of at most `max_chars` (a longer paragraph stays
    whole), in order, without empty ones; joined back with blank lines they give the text's
    paragraphs."""
    out: list[str] = []
    current = ""
    for para in (p.strip("\n") for p in text.split("\n\n")):
        if not para.strip():
            continue
        if current and len(current) + 2 + len(para) > max_chars:
            out.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


FACTS_PREFIX = "facts-"  # facts-<domain>: the fictional facts of `crma_jax.facts`, one document per fact


def is_builtin(name: str) -> bool:
    """A built-in domain name: one of `DOMAINS` or facts-<a `crma_jax.facts` domain>."""
    from crma_jax.facts import DOMAIN_RELATIONS

    return name in DOMAINS or (name.startswith(FACTS_PREFIX) and name[len(FACTS_PREFIX):] in DOMAIN_RELATIONS)


def domain_documents(name: str) -> list[str]:
    """Passages of a built-in domain's documents, in order (a facts domain: one document per
    fact); ValueError names the known domains."""
    from crma_jax.facts import DOMAIN_RELATIONS, domain_facts, training_documents

    if name.startswith(FACTS_PREFIX):
        return training_documents(domain_facts(name[len(FACTS_PREFIX):]))
    if name not in DOMAINS:
        known = [*DOMAINS, *(FACTS_PREFIX + d for d in DOMAIN_RELATIONS)]
        raise ValueError(f"unknown built-in domain {name!r}; known: {', '.join(known)}")
    return [piece for doc in DOMAINS[name]() for piece in passages(doc)]
