"""`crma_jax.domains`: the built-in offline domains and their passages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crma_jax.data import split_holdout
from crma_jax.facts import DOMAIN_RELATIONS
from crma_jax.domains import DOMAINS, PASSAGE_CHARS, domain_documents, passages

paragraph = st.text(alphabet="ab \n", min_size=1, max_size=60).map(lambda t: t.strip("\n")).filter(lambda t: t.strip())


@settings(max_examples=60, deadline=None)
@given(paras=st.lists(paragraph, min_size=1, max_size=30), limit=st.integers(10, 200))
def test_passages_keep_every_paragraph_in_order_within_the_limit(paras, limit):
    text = "\n\n".join(paras)
    out = passages(text, limit)
    assert all(p.strip() for p in out)
    # The text's non-blank paragraphs, in order (blank ones and the newlines around them go).
    assert [q for p in out for q in p.split("\n\n")] == [q.strip("\n") for q in text.split("\n\n") if q.strip()]
    # Only a passage made of one paragraph may exceed the limit.
    assert all(len(p) <= limit or "\n\n" not in p for p in out)


@pytest.mark.parametrize("name", list(DOMAINS))
def test_every_builtin_domain_has_a_holdout_of_at_least_16_distinct_passages(name):
    docs = domain_documents(name)
    _, holdout = split_holdout(docs, 0.1, seed=0)
    assert len(set(holdout)) >= 16
    assert max(len(d) for d in docs if "\n\n" in d) <= PASSAGE_CHARS  # only single paragraphs run over


def test_unknown_domain_names_the_known_ones():
    with pytest.raises(ValueError, match="changelog"):
        domain_documents("poetry")


@pytest.mark.parametrize("name", [*DOMAINS, *(f"facts-{d}" for d in DOMAIN_RELATIONS)])
def test_no_holdout_passage_of_a_builtin_domain_is_in_train_even_as_a_near_copy(name):
    from crma_jax.data import DataSpec
    from crma_jax.dedupe import drop_near_copies, exact_key

    train, holdout = DataSpec(name, seq_len=256).split_records()
    train_docs, held_docs = train.column("text"), holdout.column("text")
    assert not {exact_key(d) for d in held_docs} & {exact_key(d) for d in train_docs}
    # No holdout passage is a near copy (shingle Jaccard >= 0.8, digits masked) of a training one.
    assert drop_near_copies(train_docs + held_docs) == train_docs + held_docs


def test_builtin_domains_read_fixed_files_not_whatever_is_installed(monkeypatch, tmp_path):
    import crma_jax.domains as domains

    monkeypatch.setattr(domains, "SHELL_FILES", (str(tmp_path / "usr" / "bin" / "nonexistent"),))
    with pytest.raises(FileNotFoundError, match="nonexistent.*'shell' reads a fixed list of files"):
        domains.shell_documents()


def test_near_copies_dropped_from_a_builtin_domain_are_said(monkeypatch):
    import crma_jax.domains as domains
    from crma_jax.dedupe import DuplicatesWarning

    licence = "Permission is granted to copy, distribute and modify this file under the terms of version {} of it."
    monkeypatch.setitem(domains.DOMAINS, "legal", lambda: [licence.format(2), "A different passage entirely.",
                                                           licence.format(3)])
    with pytest.warns(DuplicatesWarning, match=r"built-in domain legal: 1 of 3 passages are exact or near copies"):
        assert domains.domain_documents("legal") == [licence.format(2), "A different passage entirely."]
