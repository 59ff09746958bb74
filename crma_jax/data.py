"""Training data: load records, tokenize, pack into fixed-length rows, split, and batch.

Pipeline: `load_records` (JSONL / text / parquet through `datasets`) -> `tokenize_records`
-> `split_holdout` (by document) -> `pack_documents` -> `BatchIterator`; `build_dataset` runs it
all for a built-in domain name or a file path.

Mask convention (matches `crma_jax.loss.next_token_loss`): `loss_mask[b, t] == 1` means token
`input_ids[b, t]` is a target predicted by `logits[b, t - 1]`. Column 0 is therefore always 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from crma_jax.domains import domain_documents, is_builtin

T = TypeVar("T")
TokenDoc = tuple[list[int], list[int]]  # (ids, loss_mask), equal lengths

# Alpaca prompt templates. The prompt ends in a newline so tokenizing prompt and output
# separately gives the same boundary a joint tokenization would on BPE vocabularies.
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


class DataError(ValueError):
    """Bad training data or tokenizer; the message names the file (and line, row or field)."""


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


def _check_utf8(path: Path) -> list[int]:
    """Raise DataError on an empty file or a non-UTF8 line; return the 1-based numbers of the
    non-blank lines (a JSONL record's line number). '\\n' is ASCII, so per-line decoding is exact."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    nonblank = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            if line.strip():
                nonblank.append(n)
    return nonblank


def _find_bad_json(path: Path) -> str:
    """Locate the first JSONL line that is not a JSON object (datasets' own error has no line)."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{n}: invalid JSON ({e.msg})"
            if not isinstance(obj, dict):
                return f"{path}:{n}: a JSONL record must be an object, got {type(obj).__name__}"
    return f"{path}: could not be read as JSONL"


def record_style(columns: Sequence[str]) -> str:
    """'alpaca' when records have both `instruction` and `output`, else 'text'."""
    return "alpaca" if {"instruction", "output"} <= set(columns) else "text"


def _column(records: Any, name: str) -> list[Any]:
    """One field of every record, from a `datasets.Dataset` or a list of dicts (None if absent)."""
    if hasattr(records, "column_names"):
        return list(records[name]) if name in records.column_names else [None] * len(records)
    return [r.get(name) for r in records]


def _columns(records: Any) -> list[str]:
    if hasattr(records, "column_names"):
        return list(records.column_names)
    return sorted({k for r in records for k in r})


def validate_records(records: Any, text_field: str, source: str, where: Callable[[int], str] | None = None) -> str:
    """Check every record has its required string fields; return the style ('text' | 'alpaca').

    Raises DataError naming `source`, the field and the row (via `where(i)`, default 'row i+1').
    """
    where = where or (lambda i: f"row {i + 1}")
    if len(records) == 0:
        raise DataError(f"{source}: no records")
    style = record_style(_columns(records))
    required = ("instruction", "output") if style == "alpaca" else (text_field,)
    optional = ("input",) if style == "alpaca" else ()
    for name in required + optional:
        for i, value in enumerate(_column(records, name)):
            if value is None and name in optional:
                continue
            if value is None:
                raise DataError(f"{source}: {where(i)}: missing field {name!r}")
            if not isinstance(value, str):
                raise DataError(f"{source}: {where(i)}: field {name!r} must be a string, got {type(value).__name__}")
    return style


def _input_files(path: Path, fmt: str | None) -> tuple[str, list[Path]]:
    """The `datasets` loader name and the files to read (a directory means all its .txt files)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path}: directory has no .txt files")
        return fmt or "text", files
    fmt = {"jsonl": "json"}.get(fmt or "", fmt) or FORMATS.get(path.suffix.lower())
    if fmt not in ("json", "text", "parquet"):
        raise DataError(f"{path}: unknown format; use .jsonl, .txt or .parquet, or pass format=")
    return fmt, [path]


def load_records(path: str | Path, *, text_field: str = "text", format: str | None = None,
                 cache_dir: str | None = None) -> Any:
    """Load a JSONL, plain-text or parquet file (or a directory of .txt files) as a `datasets.Dataset`.

    Plain text is one document per file. Records are either `{text_field: str}` or Alpaca-style
    `{instruction, input?, output}`. `format` is 'json'/'jsonl', 'text' or 'parquet' (default: from
    the suffix). Raises DataError naming the file (and line or row) on empty, non-UTF8,
    malformed or incomplete data.
    """
    import datasets

    path = Path(path)
    fmt, files = _input_files(path, format)
    lines: list[int] = []
    for f in files:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            if pq.ParquetFile(f).metadata.num_rows == 0:  # datasets fails obscurely on 0 rows
                raise DataError(f"{f}: no records (empty parquet file)")
        else:
            lines = _check_utf8(f)
            if fmt == "json" and not lines:
                raise DataError(f"{f}: no records (only blank lines)")
    kwargs: dict[str, Any] = {"sample_by": "document"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train",
                                   cache_dir=cache_dir, **kwargs)
    except Exception as e:  # datasets wraps parse errors in DatasetGenerationError, without a line
        msg = _find_bad_json(path) if fmt == "json" else f"{path}: could not be read as {fmt} ({e})"
        raise DataError(msg) from e
    if fmt == "text" and text_field != "text":
        ds = ds.rename_column("text", text_field)
    # A JSONL row maps to its non-blank line (datasets skips blank lines).
    use_lines = fmt == "json" and len(lines) == len(ds)
    where = (lambda i: f"line {lines[i]}") if use_lines else (lambda i: f"row {i + 1}")
    validate_records(ds, text_field, str(path), where)
    return ds


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


def tokenize_records(records: Any, tokenizer: Any, *, text_field: str = "text",
                     source: str = "<records>") -> list[TokenDoc]:
    """Records (a `datasets.Dataset` or list of dicts) -> [(ids, loss_mask)], one per record.

    Plain text: every token counts (mask 1). Alpaca: the formatted prompt (instruction, optional
    input) has mask 0 and only the output tokens have mask 1. No EOS is added here.
    """
    style = validate_records(records, text_field, source)
    if style == "text":
        return [(ids, [1] * len(ids)) for ids in _encode(tokenizer, _column(records, text_field), True)]
    prompts = [PROMPT_WITH_INPUT.format(instruction=ins, input=inp) if inp else PROMPT.format(instruction=ins)
               for ins, inp in zip(_column(records, "instruction"), _column(records, "input"))]
    heads = _encode(tokenizer, prompts, True)
    tails = _encode(tokenizer, _column(records, "output"), False)
    return [(h + t, [0] * len(h) + [1] * len(t)) for h, t in zip(heads, tails)]


def pack_documents(token_docs: Sequence[TokenDoc], seq_len: int, eos_id: int) -> PackedData:
    """Append EOS to each doc, concatenate in order and cut into rows of exactly `seq_len`.

    Greedy, no token dropped: a document crossing a row boundary is split, and its continuation
    starts a new segment in the next row with positions restarting at 0 (every position stays
    < seq_len, and segments never attend across rows anyway). The final row is padded with
    `eos_id` and segment 0. The appended EOS is a target (mask 1): the model learns to stop.
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
    target[:total] = np.concatenate([np.append(np.asarray(m, np.int64) != 0, True) for _, m in token_docs])
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
    `split_seed` seeds the document-level holdout split (`split_holdout`).
    """

    source: str
    seq_len: int
    holdout_fraction: float = 0.1
    split_seed: int = 0
    text_field: str = "text"
    max_documents: int | None = None

    def build(self, tokenizer: Any, vocab_size: int | None = None) -> tuple[PackedData, PackedData]:
        """(train, holdout) packed rows (see `build_dataset`)."""
        return build_dataset(self.source, tokenizer, self.seq_len, holdout_fraction=self.holdout_fraction,
                             seed=self.split_seed, text_field=self.text_field, max_documents=self.max_documents,
                             vocab_size=vocab_size)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_dataset(source: str, tokenizer: Any, seq_len: int, *, holdout_fraction: float = 0.1, seed: int = 0,
                  text_field: str = "text", max_documents: int | None = None, vocab_size: int | None = None,
                  cache_dir: str | None = None) -> tuple[PackedData, PackedData]:
    """(train, holdout) packed data from a built-in domain (`crma_jax.domains`) or a path
    to a .jsonl/.txt/.parquet file or a directory of .txt files.

    The first `max_documents` documents are kept, split by document (`split_holdout`), then each
    side is packed separately. With `vocab_size`, the tokenizer is checked against the model.
    """
    if is_builtin(source) and not Path(source).exists():
        records: Any = [{text_field: d} for d in domain_documents(source)]
    else:
        records = load_records(source, text_field=text_field, cache_dir=cache_dir)
    if max_documents is not None:
        records = records[:max_documents] if isinstance(records, list) else records.select(
            range(min(max_documents, len(records))))
    docs = tokenize_records(records, tokenizer, text_field=text_field, source=source)
    if vocab_size is not None:
        check_tokenizer(tokenizer, vocab_size, docs)
    train, holdout = split_holdout(docs, holdout_fraction, seed)
    eos = eos_id_of(tokenizer)
    return pack_documents(train, seq_len, eos), pack_documents(holdout, seq_len, eos)
