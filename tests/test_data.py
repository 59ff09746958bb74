"""Data pipeline: loading, tokenizing, packing, holdout split, resumable batches."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crma_jax.data import (
    PROMPT,
    BatchIterator,
    DataError,
    PackedData,
    DataSpec,
    build_dataset,
    check_tokenizer,
    data_summary,
    pack_documents,
    split_holdout,
    tokenize_records,
)
from crma_jax.records import Fields, check_rows
from conftest import write_jsonl

EOS = 1


@pytest.fixture(scope="module")
def tok():
    """A character-level fast tokenizer (printable ASCII, ids < 104), no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {"<unk>": 0, "</s>": EOS, "<pad>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # "." skips "\n"
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf_cache")


# ------------------------------------------------------------------------------- packing

doc_strategy = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 2**31 - 1)), min_size=1, max_size=12
)


def make_docs(spec: list[tuple[int, int]]) -> list[tuple[list[int], list[int]]]:
    docs = []
    for length, seed in spec:
        rng = np.random.default_rng(seed)
        docs.append((rng.integers(2, 100, length).tolist(), rng.integers(0, 2, length).tolist()))
    return docs


@settings(max_examples=150, deadline=None)
@given(doc_strategy, st.integers(2, 17))
def test_pack_properties(spec: list[tuple[int, int]], seq_len: int) -> None:
    docs = make_docs(spec)
    p = pack_documents(docs, seq_len, EOS)
    for a in (p.input_ids, p.segment_ids, p.positions, p.loss_mask):
        assert a.dtype == np.int32 and a.shape == (p.num_rows, seq_len)

    # No token dropped or reordered: the real tokens, row-major, are the docs each + EOS.
    stream = np.concatenate([d + [EOS] for d, _ in docs])
    real = p.segment_ids > 0
    assert p.num_tokens == len(stream) == sum(len(d) + 1 for d, _ in docs)
    np.testing.assert_array_equal(p.input_ids[real], stream)
    assert p.num_rows == -(-len(stream) // seq_len)
    # Segment 0 only on padding, and padding only at the tail of the last row (EOS, position 0).
    flat_real = real.reshape(-1)
    assert flat_real[: len(stream)].all() and not flat_real[len(stream):].any()
    assert (p.input_ids[~real] == EOS).all() and (p.positions[~real] == 0).all()
    assert (p.loss_mask[~real] == 0).all()

    # Segment starts: column 0 or a change of segment id. Positions restart there, count up inside.
    prev = np.concatenate([np.full((p.num_rows, 1), -1), p.segment_ids[:, :-1]], axis=1)
    start = real & (p.segment_ids != prev)
    assert (p.positions[start] == 0).all()
    inside = real & ~start
    assert (p.positions[:, 1:][inside[:, 1:]] == p.positions[:, :-1][inside[:, 1:]] + 1).all()
    assert (p.segment_ids[:, 0][real[:, 0]] == 1).all()
    assert (np.diff(p.segment_ids, axis=1)[real[:, 1:]] >= 0).all()
    assert (np.diff(p.segment_ids, axis=1)[real[:, 1:]] <= 1).all()
    assert (p.positions < seq_len).all()

    # Loss mask: 0 on segment starts; elsewhere the document's own mask (EOS counts).
    target = np.concatenate([m + [1] for _, m in docs])
    expect = np.zeros(p.num_rows * seq_len, np.int32)
    expect[: len(stream)] = target
    expect = expect.reshape(p.num_rows, seq_len) * ~start
    np.testing.assert_array_equal(p.loss_mask, expect)


def test_pack_example_splits_long_document() -> None:
    p = pack_documents([([5, 6, 7, 8, 9], [1] * 5), ([3], [1])], 4, EOS)
    np.testing.assert_array_equal(p.input_ids, [[5, 6, 7, 8], [9, EOS, 3, EOS]])
    np.testing.assert_array_equal(p.segment_ids, [[1, 1, 1, 1], [1, 1, 2, 2]])
    np.testing.assert_array_equal(p.positions, [[0, 1, 2, 3], [0, 1, 0, 1]])
    np.testing.assert_array_equal(p.loss_mask, [[0, 1, 1, 1], [0, 1, 0, 1]])


def test_pack_rejects_nothing() -> None:
    with pytest.raises(DataError):
        pack_documents([], 8, EOS)


# ------------------------------------------------------------------------ tokenize / alpaca


def test_alpaca_prompt_masked(tok) -> None:
    recs = [{"instruction": "Add.", "input": "2 2", "output": "4"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    docs = tokenize_records(check_rows(recs, Fields(), "<test>"), tok)
    for (ids, mask), r in zip(docs, recs):
        text = tok.decode([i for i, m in zip(ids, mask) if m])
        assert text == r["output"]
        assert mask == sorted(mask)  # prompt (0s) then output (1s)
        prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
        assert r["instruction"] in prompt and ("### Input:" in prompt) == bool(r["input"])
    p = pack_documents(docs, 64, tok.eos_token_id)
    kept = p.input_ids[p.loss_mask == 1].tolist()
    assert kept == tok("4")["input_ids"] + [EOS] + tok("hi")["input_ids"] + [EOS]


def test_prompt_completion_records_train_on_the_completion_only(tok) -> None:
    recs = [{"prompt": "The capital of France is", "completion": " Paris."},
            {"prompt": "2 + 2 =", "completion": " 4"}]
    docs = tokenize_records(check_rows(recs, Fields(), "<test>"), tok)
    for (ids, mask), r in zip(docs, recs):
        assert mask == sorted(mask) and 0 in mask  # the prompt (0s), as written, then the completion (1s)
        assert tok.decode([i for i, m in zip(ids, mask) if not m]) == r["prompt"]
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == r["completion"]
    renamed = check_rows([{"q": "a", "c": "b"}], Fields(prompt="q", completion="c"), "<test>")
    assert renamed.style == "completion"


def test_text_records_all_count(tok) -> None:
    (ids, mask), = tokenize_records(check_rows([{"body": "abc"}], Fields(text="body"), "<test>"), tok)
    assert tok.decode(ids) == "abc" and mask == [1, 1, 1]


# ----------------------------------------------------------------------------------- holdout


def test_holdout_deterministic_disjoint() -> None:
    docs = [f"doc{i}" for i in range(50)]
    tr, ho = split_holdout(docs, 0.1, seed=3)
    assert (tr, ho) == split_holdout(docs, 0.1, seed=3)
    assert set(tr).isdisjoint(ho) and sorted(tr + ho) == sorted(docs) and len(ho) == 5
    assert split_holdout(docs, 0.1, seed=4) != (tr, ho)
    tr2, ho2 = split_holdout(docs[:2], 0.01, seed=0)
    assert len(tr2) == len(ho2) == 1
    with pytest.raises(DataError, match="at least 2 documents"):
        split_holdout(docs[:1])


# ---------------------------------------------------------------------------------- iterator


def packed_rows(n: int, seq_len: int = 4) -> PackedData:
    return pack_documents([(list(range(10, 10 + seq_len - 1)), [1] * (seq_len - 1))] * n, seq_len, EOS)


@pytest.mark.parametrize("k", [0, 1, 3, 4, 7, 9])
def test_iterator_resume(k: int) -> None:
    packed = packed_rows(11)
    # Distinct rows so order is visible.
    packed = PackedData(np.arange(11 * 4, dtype=np.int32).reshape(11, 4), packed.segment_ids,
                        packed.positions, packed.loss_mask)
    ref = BatchIterator(packed, 3, seed=5)  # 3 batches per epoch: k=4, 7 cross epochs
    expected = [next(ref) for _ in range(k + 5)]
    it = BatchIterator(packed, 3, seed=5)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.state()))
    assert set(state) == {"epoch", "index"}
    resumed = BatchIterator(packed, 3, seed=5).restore(state)
    for want in expected[k:]:
        got = next(resumed)
        assert set(got) == {"input_ids", "segment_ids", "positions", "loss_mask"}
        for key in got:
            assert got[key].shape == (3, 4)
            np.testing.assert_array_equal(got[key], want[key])


def test_iterator_epochs_and_shuffle() -> None:
    packed = PackedData(np.arange(24, dtype=np.int32).reshape(6, 4), *(np.ones((6, 4), np.int32),) * 3)
    ordered = [b["input_ids"][:, 0].tolist() for b in BatchIterator(packed, 2, shuffle=False, epochs=1)]
    assert ordered == [[0, 4], [8, 12], [16, 20]]
    batches = list(BatchIterator(packed, 2, seed=1, epochs=2))
    assert len(batches) == 6
    firsts = [sorted(np.concatenate([b["input_ids"][:, 0] for b in batches[e * 3:(e + 1) * 3]]).tolist())
              for e in range(2)]
    assert firsts == [[0, 4, 8, 12, 16, 20]] * 2  # each epoch visits every row once
    assert len(list(BatchIterator(packed, 4, drop_last=False, epochs=1))) == 2


def test_per_process_rows_join_into_the_global_batch_and_resume_alike() -> None:
    """Two "processes" each materialise half of every batch; side by side they are the global
    batches, and each one's state (the global position) resumes it exactly."""
    packed = PackedData(np.arange(10 * 4, dtype=np.int32).reshape(10, 4), *(np.ones((10, 4), np.int32),) * 3)
    whole = BatchIterator(packed, 4, seed=3)
    halves = [BatchIterator(packed, 4, seed=3, rows=slice(0, 2)), BatchIterator(packed, 4, seed=3, rows=slice(2, 4))]
    for _ in range(5):  # 2 batches per epoch: crosses epochs
        want = next(whole)["input_ids"]
        got = [next(h)["input_ids"] for h in halves]
        assert got[0].shape == got[1].shape == (2, 4)
        np.testing.assert_array_equal(np.concatenate(got), want)
    assert halves[0].state() == halves[1].state() == whole.state()
    resumed = BatchIterator(packed, 4, seed=3, rows=slice(2, 4)).restore(halves[1].state())
    np.testing.assert_array_equal(next(resumed)["input_ids"], next(whole)["input_ids"][2:])
    with pytest.raises(ValueError, match="needs drop_last=True"):
        BatchIterator(packed, 4, rows=slice(0, 2), drop_last=False)


def test_iterator_too_few_rows() -> None:
    with pytest.raises(DataError, match=r"only 2 packed rows.*batch_size 3"):
        BatchIterator(packed_rows(2), 3)


def test_tokenizer_vocab_mismatch(tok) -> None:
    check_tokenizer(tok, 128)
    with pytest.raises(DataError, match=r"has \d+ tokens but the model's vocab_size is 50"):
        check_tokenizer(tok, 50)
    with pytest.raises(DataError, match="produced id 300"):
        check_tokenizer(tok, 128, [([5, 300], [1, 1])])
    with pytest.raises(DataError, match="vocab_size"):
        build_dataset("docs", tok, 64, max_documents=4, vocab_size=50)


# ------------------------------------------------------------------------------------- build


@pytest.mark.parametrize("domain", ["legal", "code", "docs", "changelog", "shell"])
def test_builtin_domains(domain: str, tok) -> None:
    train, hold = build_dataset(domain, tok, 128, max_documents=6, vocab_size=128)
    assert train.num_rows > 0 and hold.num_rows > 0 and train.num_tokens > hold.num_tokens > 0
    assert train.loss_mask.sum() > 0 and hold.loss_mask.sum() > 0


def test_build_from_file_alpaca(tmp_path: Path, tok, cache: str) -> None:
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    train, hold = build_dataset(str(write_jsonl(tmp_path / "al.jsonl", rows)), tok, 32, seed=1, cache_dir=cache)
    # Every prompt + output token plus one EOS per record survives the split and packing.
    full = [PROMPT.format(instruction=r["instruction"]) + r["output"] for r in rows]
    assert train.num_tokens + hold.num_tokens == sum(len(tok(t)["input_ids"]) + 1 for t in full)
    assert hold.num_rows >= 1
    # Targets are the outputs + EOS, less at most one per row (a continuation chunk's first token).
    targets = sum(len(tok(r["output"])["input_ids"]) + 1 for r in rows)
    got = int(train.loss_mask.sum() + hold.loss_mask.sum())
    assert targets - train.num_rows - hold.num_rows <= got <= targets


def test_separate_eval_data_trains_on_all_of_data_and_scores_all_of_eval(tmp_path: Path, tok) -> None:
    import datasets

    datasets.Dataset.from_list([{"text": f"train doc {i}"} for i in range(10)]).save_to_disk(str(tmp_path / "saved"))
    held = write_jsonl(tmp_path / "eval.jsonl", [{"body": f"eval {i}"} for i in range(3)])
    spec = DataSpec(str(tmp_path / "saved"), seq_len=16, eval_source=str(held), text_field="text")
    with pytest.raises(DataError, match="eval.jsonl: records have the fields 'body', none"):  # one set of names for both
        spec.build(tok)
    held = write_jsonl(tmp_path / "eval2.jsonl", [{"text": f"eval {i}"} for i in range(3)])
    train, hold = DataSpec(str(tmp_path / "saved"), seq_len=16, eval_source=str(held)).build(tok)
    assert train.num_tokens == sum(len(f"train doc {i}") + 1 for i in range(10))
    assert hold.num_tokens == sum(len(f"eval {i}") + 1 for i in range(3))
    split = DataSpec(str(tmp_path / "saved"), seq_len=16).build(tok)  # no eval data: a document split
    assert split[0].num_tokens + split[1].num_tokens == train.num_tokens and split[1].num_tokens < train.num_tokens


def _texts(records) -> set[str]:
    return set(records.keys())


def test_planted_duplicates_are_dropped_before_the_split_with_a_warning(tmp_path: Path) -> None:
    from crma_jax.data import DuplicatesWarning

    docs = [f"document number {i} about topic {i % 7}" for i in range(40)]
    # Ten copies of earlier documents, re-spaced and re-wrapped: duplicates up to whitespace.
    planted = docs + ["  " + d.replace(" ", "\n  ") + "\n" for d in docs[:10]]
    path = write_jsonl(tmp_path / "dup.jsonl", [{"text": t} for t in planted])
    for seed in range(5):
        with pytest.warns(DuplicatesWarning, match=r"dup\.jsonl: 10 of 50 documents are exact duplicates"):
            train, hold = DataSpec(str(path), seq_len=32, split_seed=seed, holdout_fraction=0.3).split_records()
        assert not _texts(train) & _texts(hold)  # no holdout document is also a training one
        assert len(train) + len(hold) == 40


def test_eval_data_overlapping_data_is_dropped_from_train_and_said(tmp_path: Path, tok) -> None:
    from crma_jax.data import DuplicatesWarning

    data = write_jsonl(tmp_path / "data.jsonl", [{"text": f"row {i}"} for i in range(20)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": f"row {i}"} for i in (3, 5, 7)] + [{"text": "new one"}])
    spec = DataSpec(str(data), seq_len=16, eval_source=str(evals))
    with pytest.warns(DuplicatesWarning, match=r"data\.jsonl: 3 documents are also in the evaluation data .*eval\.jsonl"):
        train, hold = spec.split_records()
    assert not _texts(train) & _texts(hold) and len(train) == 17 and len(hold) == 4
    with pytest.warns(DuplicatesWarning):
        packed_train, _ = spec.build(tok)
    assert packed_train.num_tokens == sum(len(f"row {i}") + 1 for i in range(20) if i not in (3, 5, 7))
    everything = write_jsonl(tmp_path / "all.jsonl", [{"text": f"row {i}"} for i in range(20)])
    with pytest.raises(DataError, match="no training documents left"), pytest.warns(DuplicatesWarning):
        DataSpec(str(data), seq_len=16, eval_source=str(everything)).split_records()


def test_alpaca_and_chat_duplicates_are_found_by_content(tmp_path: Path) -> None:
    from crma_jax.data import DuplicatesWarning

    rows = [{"instruction": "q", "input": "", "output": "a"}, {"instruction": " q ", "input": "", "output": "a"},
            {"instruction": "q", "input": "x", "output": "a"}]
    path = write_jsonl(tmp_path / "al.jsonl", rows)
    with pytest.warns(DuplicatesWarning, match="1 of 3"):
        train, hold = DataSpec(str(path), seq_len=16).split_records()
    assert len(train) + len(hold) == 2
    turn = lambda u: [{"role": "user", "content": u}, {"role": "assistant", "content": "ok"}]  # noqa: E731
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turn("hi")}, {"messages": turn("hi  ")},
                                                 {"messages": turn("bye")}])
    with pytest.warns(DuplicatesWarning, match="1 of 3"):
        train, hold = DataSpec(str(path), seq_len=16).split_records()
    assert len(train) + len(hold) == 2


def test_the_data_summary_counts_and_warns_about_a_small_holdout(tok) -> None:
    train = check_rows([{"text": f"train {i}"} for i in range(10)], Fields(), "src.jsonl")
    held = check_rows([{"text": "held"}], Fields(), "src.jsonl")  # the same source, another split
    train_rows, held_rows = (pack_documents(tokenize_records(r, tok), 8, EOS) for r in (train, held))
    split = data_summary(train, held, train_rows, held_rows, batch_size=2, separate=False)
    assert split["documents"] == {"train": 10, "holdout": 1, "duplicates_dropped": 0, "unusable_skipped": 0}
    assert split["tokens"]["train"] == train_rows.num_tokens == sum(len(tok(f"train {i}")["input_ids"]) + 1
                                                                    for i in range(10))
    assert split["steps_per_epoch"] == train_rows.num_rows // 2 and split["eval_source"] is None
    assert "only 1 document and" in split["warnings"][0] and "--holdout-fraction" in split["warnings"][0]
    separate = data_summary(train, held, train_rows, held_rows, batch_size=2, separate=True)
    assert separate["eval_source"] == "src.jsonl" and "evaluation data" in separate["warnings"][0]
