"""Duplicate documents: the keys that decide when two documents are the same, and a fingerprint.

Two documents are *exact duplicates* when their `exact_key`s are equal: the text with every run
of whitespace turned into one space and the ends stripped (a re-indented or re-wrapped copy is
still a copy). They are *near copies* when the word 5-grams of their `near_key`s (the exact key with every
run of digits replaced by "0", so that a version number, a date or a count never tells two
copies apart) have a Jaccard similarity of at least `NEAR_JACCARD` (`drop_near_copies`).

The data path (`crma_jax.data.DataSpec.build`) removes exact duplicates of every source; the
built-in domains (`crma_jax.domains`) also remove near copies. A user's own data keeps rows that
are merely similar ("2+2=4" and "3+3=6" are different examples).

Why 0.8: measured on the built-in domains' passages after exact dedupe (README, "Data"), pairs
at >= 0.8 are the same passage with a changed word or header (LGPL-2 against LGPL-2.1's
sections, a pydoc topic repeated inside another, zcat's header against gunzip's), while pairs
at 0.5-0.8 share boilerplate (a license header) around different content.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class DuplicatesWarning(UserWarning):
    """Documents were dropped as duplicates; the message names the source and how many."""


_DIGITS = re.compile(r"\d+")
NEAR_JACCARD = 0.8
SHINGLE_WORDS = 5


def exact_key(text: str) -> str:
    """`text` with whitespace runs collapsed to one space and the ends stripped."""
    return " ".join(text.split())


def near_key(text: str) -> str:
    """`exact_key(text)` with every run of digits replaced by "0"."""
    return _DIGITS.sub("0", exact_key(text))


def first_occurrences(keys: Sequence[str], exclude: Iterable[str] = ()) -> list[int]:
    """Indices of the first occurrence of each key, in order, skipping every key in `exclude`."""
    seen = set(exclude)
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return keep


def unique(docs: Sequence[str], key: Callable[[str], str] = exact_key) -> list[str]:
    """`docs` without the later copies of any document (same `key`), in order."""
    return [docs[i] for i in first_occurrences([key(d) for d in docs])]


def shingles(text: str, words: int = SHINGLE_WORDS) -> frozenset[str]:
    """The word `words`-grams of `near_key(text)` (the whole key when it is shorter)."""
    w = near_key(text).split(" ")
    return frozenset(" ".join(w[i:i + words]) for i in range(max(1, len(w) - words + 1)))


def drop_near_copies(docs: Sequence[str], threshold: float = NEAR_JACCARD) -> list[str]:
    """`docs` in order without any document whose shingle set has a Jaccard similarity of at least
    `threshold` with an earlier kept one (greedy: the first of a group of copies stays)."""
    index: dict[str, list[int]] = {}
    kept: list[frozenset[str]] = []
    out = []
    for doc in docs:
        s = shingles(doc)
        shared: dict[int, int] = {}
        for g in s:
            for j in index.get(g, ()):
                shared[j] = shared.get(j, 0) + 1
        if any(n / (len(s) + len(kept[j]) - n) >= threshold for j, n in shared.items()):
            continue
        for g in s:
            index.setdefault(g, []).append(len(kept))
        kept.append(s)
        out.append(doc)
    return out


def fingerprint(docs: Sequence[str]) -> dict[str, Any]:
    """{"documents": n, "sha256": hex} of `docs` in order: equal exactly when the documents are."""
    digest = hashlib.sha256()
    for d in docs:
        digest.update(json.dumps(d).encode("utf-8"))
        digest.update(b"\n")
    return {"documents": len(docs), "sha256": digest.hexdigest()}
