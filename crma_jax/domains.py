"""Five real text domains, read from files every Debian + CPython machine has, with no download.

- legal:     the license texts of Debian's base-files (`LEGAL_FILES` in `/usr/share/common-licenses`);
- code:      the Python standard library's own top-level `.py` sources;
- docs:      the Python documentation topics in `pydoc_data.topics`;
- changelog: IDLE's change history, shipped in the standard library (`CHANGELOG_FILES` in `idlelib`);
- shell:     the shell scripts of Debian's *required* packages (`SHELL_FILES`), which every Debian
             system has, whatever else is installed.

Every domain reads a fixed list of files (or the stdlib's modules), never "whatever is
installed", so its text depends only on the Python version and the Debian release; a run records
each domain's `crma_jax.dedupe.fingerprint`, and `crma cl-table` refuses to pool runs whose
fingerprints differ. A listed file that is missing is an error naming it.

Each builder returns documents in a fixed order, so runs are reproducible. `domain_documents`
cuts them into passages of at most `PASSAGE_CHARS` (`PASSAGE_CHARS_OF`) at blank lines (so that even the domains with
few, long files have a holdout of many distinct passages) and keeps the first of every group of
near copies (`crma_jax.dedupe.drop_near_copies`: the same text up to whitespace, digits and a
fifth of its word 5-grams), so that no holdout passage is a copy of a training one.
"""

from __future__ import annotations

import sysconfig
import warnings
from pathlib import Path

from crma_jax.dedupe import NEAR_JACCARD, DuplicatesWarning, drop_near_copies

LICENSES_DIR = Path("/usr/share/common-licenses")
PASSAGE_CHARS = 1200
# IDLE's change entries are short and its files few: shorter passages give its holdout >= 16.
PASSAGE_CHARS_OF = {"changelog": 800}
# base-files' license texts (the symlinks among them, e.g. GPL -> GPL-3, are read once).
LEGAL_FILES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2", "GPL-3",
               "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0")
CHANGELOG_FILES = ("NEWS.txt", "NEWS2x.txt", "ChangeLog", "HISTORY.txt")
# The shell scripts that Debian's required packages (priority "required": apt, debconf, dpkg,
# e2fsprogs, grep, gzip, libc-bin, login, passwd, sensible-utils, ...) install. On a system
# without the merged /usr, a /usr/bin or /usr/sbin file is found under /bin or /sbin.
SHELL_FILES = (
    "/usr/bin/gunzip", "/usr/bin/gzexe", "/usr/bin/zcat", "/usr/bin/zcmp", "/usr/bin/zdiff", "/usr/bin/zforce",
    "/usr/bin/zgrep", "/usr/bin/zless", "/usr/bin/zmore", "/usr/bin/znew", "/usr/bin/apt-key",
    "/usr/bin/dpkg-maintscript-helper", "/usr/bin/dpkg-realpath", "/usr/bin/ldd", "/usr/bin/savelog",
    "/usr/bin/select-editor", "/usr/bin/sensible-browser", "/usr/bin/sensible-editor", "/usr/bin/sensible-pager",
    "/usr/bin/tzselect", "/usr/bin/which.debianutils", "/usr/sbin/e2scrub", "/usr/sbin/e2scrub_all",
    "/usr/sbin/installkernel", "/usr/sbin/pam_namespace_helper", "/usr/sbin/shadowconfig", "/usr/sbin/add-shell",
    "/usr/sbin/remove-shell", "/usr/sbin/service", "/usr/sbin/tarcat", "/usr/sbin/update-shells",
    "/usr/lib/apt/apt.systemd.daily", "/usr/lib/dpkg/methods/apt/install", "/usr/lib/dpkg/methods/apt/update",
    "/usr/libexec/dpkg/dpkg-db-backup", "/usr/share/debconf/confmodule", "/usr/share/debconf/confmodule.sh",
    "/usr/share/bug/apt/script", "/usr/share/bug/dpkg", "/usr/share/sensible-utils/bin/gettext",
    "/etc/cron.daily/apt-compat", "/etc/cron.daily/dpkg", "/etc/security/namespace.init",
    "/etc/update-motd.d/10-uname", "/usr/lib/init/init-d-script",
)


def _read(path: Path, domain: str) -> str:
    """The text of `path`, or of its unmerged-/usr twin (/usr/bin/x -> /bin/x); FileNotFoundError
    naming the file and the domain when neither exists."""
    for candidate in (path, Path(str(path).replace("/usr/", "/", 1))):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace")
    raise FileNotFoundError(f"{path}: missing, and the built-in domain {domain!r} reads a fixed list of files; "
                            "use a Debian system with its required packages, or pass your own data")


def legal_documents(root: Path = LICENSES_DIR) -> list[str]:
    """One document per license of `LEGAL_FILES`, in that order."""
    return [_read(root / name, "legal") for name in LEGAL_FILES]


def code_documents(max_files: int = 400) -> list[str]:
    """Python stdlib modules (top-level `.py` files of the stdlib directory), sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())[:max_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def docs_documents() -> list[str]:
    """The Python documentation topics shipped in `pydoc_data.topics`, sorted by topic."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def changelog_documents() -> list[str]:
    """IDLE's change history (`CHANGELOG_FILES` of the stdlib's `idlelib`), in that order."""
    root = Path(sysconfig.get_paths()["stdlib"]) / "idlelib"
    return [_read(root / name, "changelog") for name in CHANGELOG_FILES]


def shell_documents() -> list[str]:
    """The shell scripts of `SHELL_FILES`, in that order."""
    return [_read(Path(p), "shell") for p in SHELL_FILES]


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
    """Passages of a built-in domain's documents, in order, without near duplicates (module
    docstring; a facts domain: one document per fact); ValueError names the known domains."""
    from crma_jax.facts import DOMAIN_RELATIONS, domain_facts, training_documents

    if name.startswith(FACTS_PREFIX):
        return training_documents(domain_facts(name[len(FACTS_PREFIX):]))
    if name not in DOMAINS:
        known = [*DOMAINS, *(FACTS_PREFIX + d for d in DOMAIN_RELATIONS)]
        raise ValueError(f"unknown built-in domain {name!r}; known: {', '.join(known)}")
    size = PASSAGE_CHARS_OF.get(name, PASSAGE_CHARS)
    pieces = [piece for doc in DOMAINS[name]() for piece in passages(doc, size)]
    kept = drop_near_copies(pieces)
    if len(kept) < len(pieces):
        warnings.warn(f"built-in domain {name}: {len(pieces) - len(kept)} of {len(pieces)} passages are exact or near "
                      f"copies (5-gram Jaccard >= {NEAR_JACCARD}, digits masked) of earlier ones; dropped before the split",
                      DuplicatesWarning, stacklevel=2)
    return kept
