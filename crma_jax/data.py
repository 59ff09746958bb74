"""Training data: tokenize records, pack them into fixed-length rows, split, and batch.

Pipeline: `crma_jax.records.load_records` (a built-in domain, a file, a saved or cached
`datasets` dataset) -> `drop_duplicates` (exact copies, and training documents that a separate
evaluation source also holds) -> `tokenize_records` (plain text, Alpaca or TRL prompt/completion
with the prompt masked, or chat through the tokenizer's template with the loss on assistant turns) -> `split_holdout`
(by document; or a separate evaluation source) -> `pack_documents` -> `BatchIterator`;
`DataSpec.build` runs it all.

Mask convention (matches `crma_jax.loss.next_token_loss`): `loss_mask[b, t] == 1` means token
`input_ids[b, t]` is a target predicted by `logits[b, t - 1]`. Column 0 is therefore always 0.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from crma_jax.chat import render_chat, require_template
from crma_jax.dedupe import DuplicatesWarning, first_occurrences  # noqa: F401 - DuplicatesWarning re-exported
from crma_jax.records import DataError, Fields, Records, load_records

T = TypeVar("T")
TokenDoc = tuple[list[int], list[int]]  # (ids, loss_mask), equal lengths

# Alpaca prompt templates. The prompt ends in a newline so tokenizing prompt and output
# separately gives the same boundary a joint tokenization would on BPE vocabularies.
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


class SkippedRowsWarning(UserWarning):
    """Rows of a source were dropped (`skip_bad_rows`); the message says how many and the first."""


def drop_duplicates(records: Records, exclude: Records | None = None) -> Records:
    """`records` without exact duplicates (`Records.keys`; the first copy stays) and, with
    `exclude`, without any record that `exclude` also holds; a `DuplicatesWarning` names the
    source and the counts whenever one is dropped. DataError when nothing is left."""
    keys = records.keys()
    unique = first_occurrences(keys)
    keep = first_occurrences(keys, exclude.keys()) if exclude is not None else unique
    copies, shared = len(keys) - len(unique), len(unique) - len(keep)
    if copies:
        warnings.warn(f"{records.source}: {copies} of {len(keys)} documents are exact duplicates (up to whitespace) "
                      "of earlier ones; dropped before the split", DuplicatesWarning, stacklevel=3)
    if shared:
        warnings.warn(f"{records.source}: {shared} documents are also in the evaluation data {exclude.source}; "
                      "dropped from training", DuplicatesWarning, stacklevel=3)
    if not keep:
        raise DataError(f"{records.source}: no training documents left after dropping duplicates")
    if len(keep) == len(keys):
        return records
    return dataclasses.replace(records.subset(keep), duplicates=records.duplicates + len(keys) - len(keep))


@dataclass(frozen=True)
class PackedData:
    """Packed rows; every array is int32 of shape (num_rows, seq_len).

    input_ids:   token ids; padding is the EOS id.
    segment_ids: 1-based index of the document (chunk) within its row; 0 only on padding.
    positions:   0 at each segment start, +1 per token; 0 on padding.
    loss_mask:   1 where the token is a target predicted from the previous token of the same
                 segment; 0 on padding, prompts and the first token of every segment.
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(np.count_nonzero(self.segment_ids))

    def rows(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
        """The batch dict {input_ids, segment_ids, positions, loss_mask} of the selected rows."""
        return {k: getattr(self, k)[index] for k in BATCH_KEYS}


def check_tokenizer(tokenizer: Any, vocab_size: int, token_docs: Sequence[TokenDoc] = ()) -> None:
    """Raise DataError if the tokenizer can produce ids the model (`vocab_size` rows) lacks:
    len(tokenizer) > vocab_size, or any id in `token_docs` >= vocab_size. A smaller tokenizer is
    fine (embedding tables are often padded)."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if len(tokenizer) > vocab_size:
        raise DataError(f"tokenizer {name!r} has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{vocab_size}: they do not match")
    top = max((max(ids) for ids, _ in token_docs if ids), default=-1)
    if top >= vocab_size:
        raise DataError(f"tokenizer {name!r} produced id {top} >= the model's vocab_size {vocab_size}")


def eos_id_of(tokenizer: Any) -> int:
    """The tokenizer's EOS id (the document separator and padding); DataError if it has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token")
    return int(eos)


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Batch-encode; with `special` the tokenizer's own BOS is kept, but a trailing EOS it adds is
    dropped because `pack_documents` appends exactly one EOS per document."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if special and eos is not None:
        out = [ids[:-1] if ids and ids[-1] == eos else ids for ids in out]
    return [list(ids) for ids in out]


def tokenize_records(records: Records, tokenizer: Any) -> list[TokenDoc]:
    """`Records` -> [(ids, loss_mask)], one per record. No EOS is added here.

    text: every token counts (mask 1). alpaca: the formatted prompt (instruction, optional input)
    has mask 0 and only the output tokens have mask 1. completion (TRL's prompt/completion): the
    prompt as written, mask 0, then the completion, mask 1. chat: the tokenizer's chat template, mask
    1 on the assistant turns only (`crma_jax.chat.render_chat`); DataError naming the source and
    row when the tokenizer has no template or the template rejects a conversation.
    """
    f = records.fields
    if records.style == "text":
        return [(ids, [1] * len(ids)) for ids in _encode(tokenizer, records.column(f.text), True)]
    if records.style == "chat":
        require_template(tokenizer, records.source)
        docs = []
        for i, messages in enumerate(records.column(f.messages)):
            try:
                docs.append(render_chat(tokenizer, messages))
            except Exception as e:  # noqa: BLE001 - a template may raise anything (jinja's TemplateError, ...)
                raise DataError(f"{records.source}: {records.where(i)}: the chat template rejects this conversation "
                                f"({type(e).__name__}: {e})") from None
        return docs
    if records.style == "completion":
        prompts, outputs = records.column(f.prompt), records.column(f.completion)
    else:
        prompts = [PROMPT_WITH_INPUT.format(instruction=ins, input=inp) if inp else PROMPT.format(instruction=ins)
                   for ins, inp in zip(records.column(f.instruction), records.column(f.input))]
        outputs = records.column(f.output)
    heads = _encode(tokenizer, prompts, True)
    tails = _encode(tokenizer, outputs, False)
    return [(h + t, [0] * len(h) + [1] * len(t)) for h, t in zip(heads, tails)]


def pack_documents(token_docs: Sequence[TokenDoc], seq_len: int, eos_id: int, eos_target: bool = True) -> PackedData:
    """Append EOS to each doc, concatenate in order and cut into rows of exactly `seq_len`.

    Greedy, no token dropped: a document crossing a row boundary is split, and its continuation
    starts a new segment in the next row with positions restarting at 0 (every position stays
    < seq_len, and segments never attend across rows anyway). The final row is padded with
    `eos_id` and segment 0. The appended EOS is a target (mask 1: the model learns to stop)
    unless `eos_target` is False (chat: the template's own end-of-turn already is one).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not token_docs:
        raise DataError("no documents to pack")
    for i, (ids, mask) in enumerate(token_docs):
        if len(ids) != len(mask):
            raise ValueError(f"document {i}: {len(ids)} ids but {len(mask)} loss-mask entries")
    lengths = np.array([len(ids) + 1 for ids, _ in token_docs], np.int64)
    total = int(lengths.sum())
    rows = -(-total // seq_len)
    size = rows * seq_len
    ids = np.full(size, eos_id, np.int32)
    target = np.zeros(size, np.int32)
    doc_start = np.zeros(size, bool)
    ids[:total] = np.concatenate([np.append(np.asarray(d, np.int64), eos_id) for d, _ in token_docs])
    target[:total] = np.concatenate([np.append(np.asarray(m, np.int64) != 0, eos_target) for _, m in token_docs])
    doc_start[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    real = np.arange(size) < total

    shape = (rows, seq_len)
    ids, target, real = ids.reshape(shape), target.reshape(shape), real.reshape(shape)
    start = doc_start.reshape(shape)
    start[:, 0] = True  # a continuation chunk at a row start is a new segment
    start &= real
    segment_ids = np.where(real, np.cumsum(start, axis=1), 0).astype(np.int32)
    col = np.broadcast_to(np.arange(seq_len), shape)
    last_start = np.maximum.accumulate(np.where(start, col, 0), axis=1)
    positions = np.where(real, col - last_start, 0).astype(np.int32)
    loss_mask = (target.astype(bool) & real & ~start).astype(np.int32)
    return PackedData(ids, segment_ids, positions, loss_mask)


def split_holdout(docs: Sequence[T], fraction: float = 0.1, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split documents into (train, holdout) by a seeded permutation; both keep input order.

    round(fraction * n) documents are held out, clamped to [1, n - 1], so neither side is empty
    and no document is in both. Deterministic in (len(docs), fraction, seed).
    """
    n = len(docs)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise DataError(f"need at least 2 documents to split off a holdout, got {n}")
    n_hold = min(n - 1, max(1, round(fraction * n)))
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:n_hold]] = True
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Deterministic, resumable batches of packed rows: dicts of int32 arrays (B, T).

    Epoch e visits the rows in `default_rng([seed, e]).permutation` order (identity without
    shuffle). `state()` is {"epoch": int, "index": int}, the next batch's epoch and index within
    that epoch; `restore(state)` resumes exactly. Infinite unless `epochs` is given.

    `rows` selects the part of each batch this process materialises (in a multi-process run,
    `crma_jax.distributed.local_rows`): batches are then (rows.stop − rows.start, T), while the
    order and `state()` stay those of the global batch, the same in every process.
    """

    def __init__(self, packed: PackedData, batch_size: int, seed: int = 0, *, shuffle: bool = True,
                 drop_last: bool = True, epochs: int | None = None, rows: slice | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if packed.num_rows < batch_size:
            raise DataError(f"only {packed.num_rows} packed rows of {packed.seq_len} tokens, fewer than "
                            f"batch_size {batch_size}: use more data, a smaller batch or a shorter seq_len")
        self.packed, self.batch_size, self.seed = packed, batch_size, seed
        self.shuffle, self.drop_last, self.epochs = shuffle, drop_last, epochs
        if rows is not None and not drop_last:
            # A short last batch cannot be split into the processes' equal shares.
            raise ValueError("rows= (a process's share of each batch) needs drop_last=True")
        self.rows = rows if rows is not None else slice(0, batch_size)
        n = packed.num_rows
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._epoch, self._index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # cached (epoch, permutation)

    def order(self, epoch: int) -> np.ndarray:
        """Row order of `epoch` (a pure function of seed and epoch)."""
        if self._order is None or self._order[0] != epoch:
            n = self.packed.num_rows
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def __next__(self) -> dict[str, np.ndarray]:
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        b = self.batch_size
        rows = self.order(self._epoch)[self._index * b:(self._index + 1) * b][self.rows]
        self._index += 1
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return self.packed.rows(rows)

    def __iter__(self) -> BatchIterator:
        return self

    def state(self) -> dict[str, int]:
        """JSON-able position of the next batch: {"epoch": e, "index": i}."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: Mapping[str, Any]) -> BatchIterator:
        """Continue from a `state()`; raises DataError on a state that does not fit this data."""
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"bad iterator state {state!r}: need integer 'epoch' and 'index'") from e
        if epoch < 0 or not 0 <= index < self.steps_per_epoch:
            raise DataError(f"iterator state {state!r} is out of range ({self.steps_per_epoch} batches per epoch)")
        self._epoch, self._index = epoch, index
        return self


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides which packed rows a run trains and evaluates on.

    A run records its spec, so that `crma eval RUN` rebuilds exactly the run's holdout split.
    `source` (and `eval_source`) are anything `crma_jax.records.load_records` takes; `config`
    and `split` pick a `datasets` config (for both) and split. Without `eval_source` the holdout is a
    document-level split of `source` (`holdout_fraction`, seeded by `split_seed`); with it, every
    document of `source` trains and every document of `eval_source` (its `eval_split`, default
    `split`) evaluates. The `*_field`s rename the record fields (`crma_jax.records.Fields`);
    `skip_bad_rows` drops unusable rows with a `SkippedRowsWarning` instead of failing.
    """

    source: str
    seq_len: int
    holdout_fraction: float = 0.1
    split_seed: int = 0
    text_field: str = "text"
    max_documents: int | None = None
    messages_field: str = "messages"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    config: str | None = None
    split: str = "train"
    eval_source: str | None = None
    eval_split: str | None = None
    skip_bad_rows: bool = False
    prompt_field: str = "prompt"
    completion_field: str = "completion"

    @property
    def fields(self) -> Fields:
        return Fields(self.text_field, self.messages_field, self.instruction_field, self.input_field, self.output_field,
                      self.prompt_field, self.completion_field)

    def records(self, evaluation: bool = False, cache_dir: str | None = None) -> Records:
        """The usable records of the training source, or (`evaluation`) of `eval_source`."""
        if evaluation:
            source, config, split = self.eval_source, self.config, self.eval_split or self.split
        else:
            source, config, split = self.source, self.config, self.split
        records = load_records(source, fields=self.fields, config=config, split=split,
                               max_documents=self.max_documents, cache_dir=cache_dir, skip_bad=self.skip_bad_rows)
        if records.skipped:
            warnings.warn(records.skipped, SkippedRowsWarning, stacklevel=2)
        return records

    def split_records(self, cache_dir: str | None = None) -> tuple[Records, Records]:
        """(train, holdout) records. Exact duplicates (`drop_duplicates`) go before the split, so
        no document is on both sides; with `eval_source`, a training document that the evaluation
        data also holds goes too. Each drop is reported by a `DuplicatesWarning`."""
        records = drop_duplicates(self.records(cache_dir=cache_dir))
        if self.eval_source:
            held = drop_duplicates(self.records(evaluation=True, cache_dir=cache_dir))
            return drop_duplicates(records, exclude=held), held
        train, holdout = split_holdout(list(range(len(records))), self.holdout_fraction, self.split_seed)
        return records.subset(train), records.subset(holdout)

    def build(self, tokenizer: Any, vocab_size: int | None = None,
              cache_dir: str | None = None) -> tuple[PackedData, PackedData]:
        """(train, holdout) packed rows of `split_records`. With `vocab_size`, the tokenizer is
        checked against the model."""
        return self.pack(*self.split_records(cache_dir), tokenizer, vocab_size)

    def pack(self, records: Records, held: Records, tokenizer: Any,
             vocab_size: int | None = None) -> tuple[PackedData, PackedData]:
        """(train, holdout) packed rows of the records `split_records` returned."""
        train, holdout = tokenize_records(records, tokenizer), tokenize_records(held, tokenizer)
        if vocab_size is not None:
            check_tokenizer(tokenizer, vocab_size, train + holdout)
        eos = eos_id_of(tokenizer)
        # A chat template ends each turn itself: an EOS after a conversation is no target.
        return (pack_documents(train, self.seq_len, eos, records.style != "chat"),
                pack_documents(holdout, self.seq_len, eos, held.style != "chat"))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# A holdout below either bound gives a loss too noisy to compare runs by (`data_summary` warns).
SMALL_HOLDOUT_TOKENS = 1000
SMALL_HOLDOUT_DOCUMENTS = 8


def data_summary(train: Records, held: Records, train_rows: PackedData, holdout_rows: PackedData,
                 batch_size: int, separate: bool) -> dict[str, Any]:
    """What a run trains and evaluates on, as JSON: the records `DataSpec.split_records` returned
    and their packed rows. Tokens count every real token (the EOS after each document included);
    `*_in_loss` only the targets (an Alpaca output, a chat's assistant turns). `warnings` says
    when the holdout is too small to trust (`SMALL_HOLDOUT_TOKENS`, `SMALL_HOLDOUT_DOCUMENTS`).
    `separate`: the holdout is separate evaluation data (`DataSpec.eval_source`), not a split."""
    summary: dict[str, Any] = {
        "source": train.source, "eval_source": held.source if separate else None, "style": train.style,
        "documents": {"train": len(train), "holdout": len(held),
                      "duplicates_dropped": train.duplicates + (held.duplicates if separate else 0),
                      "unusable_skipped": train.skipped_rows + (held.skipped_rows if separate else 0)},
        "tokens": {"train": train_rows.num_tokens, "train_in_loss": int(train_rows.loss_mask.sum()),
                   "holdout": holdout_rows.num_tokens, "holdout_in_loss": int(holdout_rows.loss_mask.sum())},
        "rows": {"train": train_rows.num_rows, "holdout": holdout_rows.num_rows, "seq_len": train_rows.seq_len},
        "steps_per_epoch": train_rows.num_rows // batch_size,
    }
    counts = ((len(held), "document", SMALL_HOLDOUT_DOCUMENTS),
              (holdout_rows.num_tokens, "token", SMALL_HOLDOUT_TOKENS))
    small = [f"{n} {what}{'s' if n != 1 else ''}" for n, what, bound in counts if n < bound]
    summary["warnings"] = [] if not small else [
        f"the holdout has only {' and '.join(small)} (fewer than {SMALL_HOLDOUT_DOCUMENTS} documents or "
        f"{SMALL_HOLDOUT_TOKENS} tokens): its loss is too noisy to compare runs by. Hold out more "
        + ("evaluation data" if separate else "with --holdout-fraction") + " or pass a larger --eval-data"]
    return summary


def build_dataset(source: str, tokenizer: Any, seq_len: int, *, holdout_fraction: float = 0.1, seed: int = 0,
                  text_field: str = "text", max_documents: int | None = None, vocab_size: int | None = None,
                  cache_dir: str | None = None) -> tuple[PackedData, PackedData]:
    """(train, holdout) packed data of `source` with a document-level holdout: `DataSpec.build`
    with the spec's other settings at their defaults."""
    spec = DataSpec(source, seq_len, holdout_fraction, seed, text_field, max_documents)
    return spec.build(tokenizer, vocab_size, cache_dir)
