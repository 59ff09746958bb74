"""`crma_jax.dedupe`: duplicate keys, near copies and fingerprints."""

from __future__ import annotations

from crma_jax.dedupe import drop_near_copies, exact_key, fingerprint, first_occurrences, near_key, unique


def test_exact_key_ignores_whitespace_only():
    assert exact_key("  a\n\tb  c ") == exact_key("a b c") == "a b c"
    assert exact_key("a b") != exact_key("ab")


def test_near_key_masks_digits():
    assert near_key("pkg (1.2.3-4) 2024-01-02") == near_key("pkg (10.0.1-1) 1999-12-31")
    assert near_key("pkg 1") != near_key("other 1")


def test_first_occurrences_keeps_the_first_copy_and_skips_excluded_keys():
    assert first_occurrences(["a", "b", "a", "c", "b"]) == [0, 1, 3]
    assert first_occurrences(["a", "b", "a", "c"], exclude={"b"}) == [0, 3]
    assert unique(["x y", "x  y", "z"]) == ["x y", "z"]


def test_near_copies_go_and_different_texts_stay():
    import itertools

    names = ["".join(p) for p in itertools.product("abcdefgh", repeat=2)]  # digit-free words
    base = "Copyright 2001 " + " ".join(names[:50])
    edited = base.replace(" bc ", " changed ")  # one word of 52 changed: 43 of 53 5-grams shared
    other = "Copyright 2001 " + " ".join(names[10:60])  # 40 of 60 shared
    released = base.replace("2001", "2024")  # digits only
    assert drop_near_copies([base, edited, other, released]) == [base, other]
    assert drop_near_copies([base, other], threshold=1.0) == [base, other]


def test_fingerprint_changes_when_one_document_does():
    docs = ["a", "b", "c"]
    assert fingerprint(docs) == fingerprint(list(docs))
    assert fingerprint(docs)["documents"] == 3
    assert fingerprint(["a", "b", "c "]) != fingerprint(docs)
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
