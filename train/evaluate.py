"""`crma eval MODEL --data D`: next-token loss and perplexity of a model on text.

`--data` is a built-in domain name (legal, code, docs) or a text/JSONL file. Documents are
tokenized, joined with EOS, and cut into rows of `seq_len` tokens (the ragged tail is dropped).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from crma_jax.domains import DOMAINS, domain_documents
from crma_jax.loss import next_token_loss


def read_documents(data: str) -> list[str]:
    """Documents from a built-in domain name, a `.jsonl` file (field `text`) or a text file."""
    if data in DOMAINS:
        return domain_documents(data)
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file (or built-in domain: {', '.join(DOMAINS)})")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "text" not in row:
                    raise ValueError(f"{path}:{i}: no 'text' field")
                docs.append(row["text"])
    else:
        docs = [path.read_text(encoding="utf-8")]
    if not any(d.strip() for d in docs):
        raise ValueError(f"{path}: no text")
    return docs


def token_rows(tokenizer: Any, documents: Iterable[str], seq_len: int, max_rows: int | None = None) -> np.ndarray:
    """(N, seq_len) int32 rows of EOS-joined token ids."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if max_rows is not None and len(ids) >= max_rows * seq_len:
            break
    n = len(ids) // seq_len if max_rows is None else min(len(ids) // seq_len, max_rows)
    if n == 0:
        raise ValueError(f"not enough text for one row of {seq_len} tokens ({len(ids)} tokens)")
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


def evaluate(
    model: Any, variables: dict[str, Any], rows: np.ndarray, batch_size: int = 4, crma_enabled: bool = True
) -> dict[str, float]:
    """Mean next-token loss and perplexity over `rows`, batch by batch."""

    @jax.jit
    def step(batch: jax.Array) -> tuple[jax.Array, jax.Array]:
        return next_token_loss(model.apply(variables, batch, crma_enabled=crma_enabled), batch)

    total, count = 0.0, 0.0
    for i in tqdm(range(0, len(rows), batch_size), desc="eval", unit="batch", leave=False):
        s, c = step(jnp.asarray(rows[i : i + batch_size]))
        total, count = total + float(s), count + float(c)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count)}
