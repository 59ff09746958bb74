"""Training records: where they come from, which fields hold what, and which rows are usable.

Sources (`load_records`), tried in this order (an existing path wins over a built-in name):

- a built-in domain name (`crma_jax.domains`): one record per passage;
- a file: `.jsonl`/`.json` (one JSON object per line), `.txt` (one document per file),
  `.parquet`; or a directory of `.txt` files;
- a `datasets` `save_to_disk` directory (a Dataset, or a DatasetDict and its `split`);
- a `datasets` name (`owner/name`, with `config` and `split`), resolved from the local HF cache
  only (`load_dataset` in offline mode): nothing is downloaded at run time, and the error says
  where it looked.

Styles (`Fields.style`), decided by the columns present: **chat** (a `messages` list of
`{"role", "content"}` turns, the OpenAI/HF layout; ShareGPT's `conversations` list of
`{"from", "value"}` turns is mapped to it), **alpaca** (`instruction`, optional `input`,
`output`), **completion** (TRL's `prompt` and `completion` strings; the loss is on the
completion only) or **text**. `Fields` renames every field. Records with none of these shapes
are refused with their columns named and, for a known other shape (`question`/`answer`), the
renaming that reads them.

A row that cannot be used (a missing or mistyped field, an empty conversation, an unknown role,
no assistant turn, a conversation that opens with the assistant) is never dropped silently: by
default the load raises DataError naming the source, how many rows are bad and the first one
(its JSONL line, or row number); with `skip_bad=True` they are dropped and the same report
comes back in `Records.skipped`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from crma_jax.dedupe import exact_key
from crma_jax.domains import domain_documents, is_builtin

FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
CHAT_ROLES = ("system", "user", "assistant", "tool")
STYLES = ("text", "alpaca", "completion", "chat")
# ShareGPT's turn speakers, as chat roles (other speakers are refused as unknown roles).
SHAREGPT = "conversations"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "function_response": "tool", "observation": "tool"}


# The longest record (a JSONL line, a .txt document) a load accepts, checked before anything is
# parsed or tokenized: one 200 MB line would otherwise take gigabytes of memory to refuse.
MAX_RECORD_BYTES = 8 << 20


class DataError(ValueError):
    """Bad training data or tokenizer; the message names the file (and line, row or field)."""


@dataclass(frozen=True)
class Fields:
    """Which record fields hold the text (plain), the conversation (chat) and Alpaca's parts."""

    text: str = "text"
    messages: str = "messages"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    completion: str = "completion"

    def style(self, columns: Sequence[str]) -> str:
        """'chat' with a messages column, 'alpaca' with instruction and output, 'completion' with
        prompt and completion, else 'text'."""
        if self.messages in columns:
            return "chat"
        if {self.instruction, self.output} <= set(columns):
            return "alpaca"
        return "completion" if {self.prompt, self.completion} <= set(columns) else "text"


@dataclass(frozen=True)
class Records:
    """Usable records of one source: a `datasets.Dataset` or a list of dicts, all of `style`.

    skipped: the report of rows dropped with `skip_bad=True` (None when none were).
    skipped_rows, duplicates: how many rows of the source were dropped as unusable, and (by
             `crma_jax.data.drop_duplicates`) as duplicates, before these.
    where:   where record i came from in the source ('line 7' of a JSONL, 'row 3'), counted before
             any row was skipped.
    """

    rows: Any
    style: str
    source: str
    fields: Fields
    skipped: str | None = None
    where: Callable[[int], str] = lambda i: f"row {i + 1}"
    skipped_rows: int = 0
    duplicates: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        """One field of every row (None where it is absent)."""
        return _column(self.rows, name)

    def keys(self, key: Callable[[str], str] = exact_key) -> list[str]:
        """Per row, the content that makes it a duplicate of another row: `key` (by default
        `crma_jax.dedupe.exact_key`) of its text, of each Alpaca field, or of each turn's content
        with its role. `key=str` gives the content exactly as trained on."""
        f = self.fields
        if self.style == "text":
            return [key(t) for t in self.column(f.text)]
        if self.style == "chat":
            return [json.dumps([[t["role"], key(t["content"])] for t in m]) for m in self.column(f.messages)]
        if self.style == "completion":
            return [json.dumps([key(p), key(c)]) for p, c in zip(self.column(f.prompt), self.column(f.completion))]
        parts = zip(self.column(f.instruction), self.column(f.input), self.column(f.output))
        return [json.dumps([key(x or "") for x in row]) for row in parts]

    def subset(self, keep: Sequence[int]) -> Records:
        """The rows `keep` (indices, in order), with `where` still naming their place in the source."""
        rows = self.rows.select(keep) if hasattr(self.rows, "select") else [self.rows[i] for i in keep]
        where = self.where
        return dataclasses.replace(self, rows=rows, where=lambda j: where(keep[j]))


def _column(rows: Any, name: str) -> list[Any]:
    if hasattr(rows, "column_names"):
        return list(rows[name]) if name in rows.column_names else [None] * len(rows)
    return [r.get(name) for r in rows]


def _columns(rows: Any) -> list[str]:
    if hasattr(rows, "column_names"):
        return list(rows.column_names)
    return sorted({k for r in rows for k in r})


def conversation_problem(messages: Any) -> str | None:
    """Why `messages` is not a usable chat conversation (None if it is)."""
    if not isinstance(messages, list) or not messages:
        return "an empty conversation" if isinstance(messages, list) else (
            f"'messages' must be a list of turns, got {type(messages).__name__}")
    for turn in messages:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str) or not isinstance(
                turn.get("content"), str):
            return "every turn needs a string 'role' and a string 'content'"
        if turn["role"] not in CHAT_ROLES:
            return f"unknown role {turn['role']!r} (use {', '.join(CHAT_ROLES)})"
    if not any(t["role"] == "assistant" for t in messages):
        return "no assistant turn (nothing to learn)"
    if messages[0]["role"] == "assistant":
        # Its span would start at the conversation's start, taking in whatever the template puts
        # before the first turn (a default system prompt, the assistant header) as targets.
        return "it starts with an assistant turn (start with a system or user turn)"
    return None


def _problems(rows: Any, style: str, fields: Fields, sharegpt: bool = False) -> Iterator[str | None]:
    """Per row: why it cannot be used in `style`, or None."""
    if style == "chat":
        label = f"{SHAREGPT!r} (ShareGPT speakers: {', '.join(SHAREGPT_ROLES)})" if sharegpt else repr(fields.messages)
        yield from (f"field {label}: {p}" if (p := conversation_problem(m)) else None
                    for m in _column(rows, fields.messages))
        return
    required = {"alpaca": (fields.instruction, fields.output), "completion": (fields.prompt, fields.completion),
                "text": (fields.text,)}[style]
    optional = (fields.input,) if style == "alpaca" else ()
    columns = {name: _column(rows, name) for name in required + optional}
    for i in range(len(rows)):
        problem = None
        for name in required + optional:
            value = columns[name][i]
            if value is None and name in required:
                problem = f"missing field {name!r}"
            elif value is not None and not isinstance(value, str):
                problem = f"field {name!r} must be a string, got {type(value).__name__}"
            if problem:
                break
        yield problem


def sharegpt_messages(conversation: Any) -> Any:
    """A ShareGPT conversation (a list of `{"from", "value"}` turns) as chat `messages`. Turns
    that are not of that shape are passed on unchanged, for `conversation_problem` to name."""
    if not isinstance(conversation, list):
        return conversation
    return [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]) if isinstance(t["from"], str) else t["from"],
             "content": t["value"]}
            if isinstance(t, Mapping) and {"from", "value"} <= set(t) else t for t in conversation]


def _no_known_shape(source: str, columns: Sequence[str], fields: Fields) -> DataError:
    """The error for records that have no field of any style: their columns, the shapes that are
    read, and the renaming for a known other shape."""
    hint = ""
    if {"question", "answer"} <= set(columns):
        hint = (" Question/answer records read as Alpaca records with the loss on the answer: --instruction-field "
                "question --output-field answer (Fields(instruction='question', output='answer') in Python).")
    return DataError(
        f"{source}: records have the fields {', '.join(map(repr, sorted(columns)))}, none of the shapes crma reads: "
        f"{fields.text!r} (plain text), {fields.messages!r} (chat turns) or {SHAREGPT!r} (ShareGPT turns), "
        f"{fields.instruction!r} + {fields.output!r} (Alpaca), {fields.prompt!r} + {fields.completion!r} (TRL "
        f"prompt/completion). Rename a field with --text-field, --messages-field, --instruction-field, "
        f"--output-field, --prompt-field or --completion-field.{hint}")


def check_rows(rows: Any, fields: Fields, source: str, where: Callable[[int], str] | None = None,
               skip_bad: bool = False) -> Records:
    """The usable rows of `rows` as `Records`; DataError (or, with `skip_bad`, a report) for the
    rest, naming how many and the first (`where(i)`, default 'row i+1'). ShareGPT rows (a
    `conversations` column and no messages column) become chat rows (`sharegpt_messages`)."""
    where = where or (lambda i: f"row {i + 1}")
    if len(rows) == 0:
        raise DataError(f"{source}: no records")
    columns = _columns(rows)
    style = fields.style(columns)
    sharegpt = False
    if style == "text" and fields.text not in columns:
        # ShareGPT only where no other style applies: a source with a text field as well keeps it.
        if SHAREGPT not in columns:
            raise _no_known_shape(source, columns, fields)
        rows, style, sharegpt = [{fields.messages: sharegpt_messages(c)} for c in _column(rows, SHAREGPT)], "chat", True
    bad = [(i, p) for i, p in enumerate(_problems(rows, style, fields, sharegpt)) if p]
    if not bad:
        return Records(rows, style, source, fields, where=where)
    first, why = bad[0]
    report = (f"{source}: {len(bad)} of {len(rows)} rows ({style} records) cannot be used; the first, "
              f"{where(first)}: {why}")
    if not skip_bad or len(bad) == len(rows):
        raise DataError(report if len(bad) > 1 else f"{source}: {where(first)}: {why}")
    keep = sorted(set(range(len(rows))) - {i for i, _ in bad})
    return Records(rows, style, source, fields, skipped=report + "; skipped", where=where,
                   skipped_rows=len(bad)).subset(keep)


# ----------------------------------------------------------------------------------------------
# Files.


def _scan_lines(path: Path, json_objects: bool = False, cap: int | None = None) -> list[int]:
    """Raise DataError on an empty file, a non-UTF8 line, a line longer than `cap` bytes (the
    default `MAX_RECORD_BYTES`) or, with `json_objects`, a non-blank line that is not a JSON
    object; return the 1-based numbers of the non-blank lines (a JSONL record's line number).

    Every line is checked here, before `datasets` reads the file, so that a bad line is named
    once with its line number, without pyarrow's own message first. Reads at most `cap` + 1 bytes
    at a time, so a huge line costs no memory. '\\n' is ASCII, so per-line decoding is exact."""
    cap = MAX_RECORD_BYTES if cap is None else cap
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    nonblank = []
    with path.open("rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(cap + 1), b""), 1):
            if len(raw) > cap:
                raise DataError(f"{path}:{n}: a record longer than {cap >> 20} MiB (crma_jax.records."
                                f"MAX_RECORD_BYTES); split it into documents of a sensible size")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            nonblank.append(n)
            if json_objects:
                try:
                    text = line.rstrip("\r\n")
                    obj = json.loads(text.removeprefix("\ufeff") if n == 1 else text)  # a BOM opens some files
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: a JSONL record must be an object, got {type(obj).__name__}")
    return nonblank


def _unreadable_json(path: Path, error: Exception) -> str:
    """What `datasets` could not read in a file whose every line is a JSON object (e.g. a field
    with two types): its error's own last words."""
    cause = error.__cause__ or error.__context__ or error
    detail = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
    return f"{path}: could not be read as JSONL ({detail[:300]})"


def _input_files(path: Path, fmt: str | None) -> tuple[str, list[Path]]:
    """The `datasets` loader name and the files to read (a directory means all its .txt files)."""
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path}: directory has no .txt files (and is no datasets save_to_disk directory)")
        return fmt or "text", files
    fmt = {"jsonl": "json"}.get(fmt or "", fmt) or FORMATS.get(path.suffix.lower())
    if fmt not in ("json", "text", "parquet"):
        raise DataError(f"{path}: unknown format; use .jsonl, .txt or .parquet, or pass format=")
    return fmt, [path]


def _load_files(path: Path, fields: Fields, fmt: str | None, cache_dir: str | None) -> tuple[Any, Callable[[int], str]]:
    import datasets

    fmt, files = _input_files(path, fmt)
    lines: list[int] = []
    for f in files:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            if pq.ParquetFile(f).metadata.num_rows == 0:  # datasets fails obscurely on 0 rows
                raise DataError(f"{f}: no records (empty parquet file)")
        else:
            if fmt == "text" and f.stat().st_size > MAX_RECORD_BYTES:  # one document per file
                raise DataError(f"{f}: a document longer than {MAX_RECORD_BYTES >> 20} MiB (crma_jax.records."
                                f"MAX_RECORD_BYTES); split it into files of a sensible size")
            # A .json file may hold one array over many lines; .jsonl has one object per line.
            lines = _scan_lines(f, json_objects=fmt == "json" and f.suffix.lower() != ".json")
            if fmt == "json" and not lines:
                raise DataError(f"{f}: no records (only blank lines)")
    kwargs: dict[str, Any] = {"sample_by": "document"} if fmt == "text" else {}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" is noise in a training log
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir,
                                   **kwargs)
    except Exception as e:  # datasets wraps parse errors in DatasetGenerationError, without a line
        msg = _unreadable_json(path, e) if fmt == "json" else f"{path}: could not be read as {fmt} ({e})"
        raise DataError(msg) from e
    finally:
        if bars:
            datasets.enable_progress_bars()
    if fmt == "text" and fields.text != "text":
        ds = ds.rename_column("text", fields.text)
    # A JSONL row maps to its non-blank line (datasets skips blank lines).
    if fmt == "json" and len(lines) == len(ds):
        return ds, lambda i: f"line {lines[i]}"
    return ds, lambda i: f"row {i + 1}"


# ----------------------------------------------------------------------------------------------
# datasets: saved directories and names in the local cache.


def is_saved_dataset(path: Path) -> bool:
    """A `Dataset.save_to_disk` or `DatasetDict.save_to_disk` directory."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _load_saved(path: Path, split: str) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; the saved dataset has {sorted(loaded)}")
        return loaded[split]
    return loaded


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub access off for `datasets` and `huggingface_hub` inside the block, whatever the environment."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _load_named(name: str, config: str | None, split: str, cache_dir: str | None) -> Any:
    import datasets
    import datasets.config

    where = cache_dir or datasets.config.HF_DATASETS_CACHE
    try:
        with _offline():
            return datasets.load_dataset(name, config or None, split=split, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - every failure of the lookup means the same to the user
        detail = str(e).strip().splitlines()
        raise DataError(
            f"{name}: not a file, a built-in domain, a save_to_disk directory, or a dataset in the local HF cache "
            f"(looked in {where}; config {config!r}, split {split!r}: {detail[-1] if detail else type(e).__name__}). "
            f"Nothing is downloaded at run time: run datasets.load_dataset({name!r}) once where the Hub is reachable, "
            f"or save the dataset with save_to_disk and pass its directory") from None


def check_source(source: str | Path) -> None:
    """DataError at once for a source that names a file that is not there (a path with a data
    suffix or a leading ".", "/" or "~", that is no built-in domain), so that a typo in --data
    fails before a model loads. Names of datasets in the local cache are checked when loaded."""
    text, path = str(source), Path(source)
    if is_builtin(text) or path.exists():
        return
    if path.suffix.lower() in FORMATS or text.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or directory")


def load_records(source: str | Path, *, fields: Fields = Fields(), format: str | None = None,
                 config: str | None = None, split: str = "train", max_documents: int | None = None,
                 cache_dir: str | None = None, skip_bad: bool = False) -> Records:
    """The usable records of `source` (module docstring): a built-in domain, a file or directory,
    a `save_to_disk` directory or a `datasets` name in the local cache. The first
    `max_documents` rows are kept, then checked (`check_rows`). Raises DataError naming the
    source (and line, row or field) on empty, non-UTF8, malformed or unusable data."""
    text = str(source)
    path = Path(source)
    where: Callable[[int], str] | None = None
    if is_builtin(text) and not path.exists():
        rows: Any = [{fields.text: d} for d in domain_documents(text)]
    elif path.exists():
        if is_saved_dataset(path):
            rows = _load_saved(path, split)
        else:
            rows, where = _load_files(path, fields, format, cache_dir)
    else:
        check_source(text)
        rows = _load_named(text, config, split, cache_dir)
    if max_documents is not None:
        rows = rows[:max_documents] if isinstance(rows, list) else rows.select(range(min(max_documents, len(rows))))
    return check_rows(rows, fields, text, where, skip_bad)
