"""The domains of a `crma cl` run: each split once for every condition and seed, fingerprinted so
that runs over different documents are never mixed, and REPLAY's mix of earlier rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from crma_jax.data import BATCH_KEYS, DataSpec, PackedData
from crma_jax.dedupe import fingerprint
from crma_jax.train.config import TrainConfig
from crma_jax.train.finetune import data_spec

Domain = tuple[PackedData, PackedData, DataSpec]  # (train, holdout, spec)


def mix_replay(current: PackedData, earlier: list[PackedData], fraction: float, seed: int) -> PackedData:
    """`current`'s rows plus rows drawn (without replacement where possible) from `earlier`, so
    that they make up `fraction` of the result; the mix is shuffled by the training iterator."""
    if not earlier or fraction <= 0:
        return current
    pool = {k: np.concatenate([getattr(d, k) for d in earlier]) for k in BATCH_KEYS}
    n_pool, n_extra = pool["input_ids"].shape[0], round(fraction / (1 - fraction) * current.num_rows)
    rng = np.random.default_rng(seed)
    picked = rng.choice(n_pool, n_extra, replace=n_extra > n_pool)
    return PackedData(**{k: np.concatenate([getattr(current, k), v[picked]]) for k, v in pool.items()})


def build_domains(cfg: TrainConfig, sources: dict[str, str], tokenizer: Any) -> tuple[dict[str, Domain], dict[str, Any]]:
    """Every domain's (train, holdout, spec), split once for every condition and seed (the
    holdout never depends on the seed), and its fingerprint: {"train", "holdout"} each the
    `crma_jax.dedupe.fingerprint` of the documents exactly as trained on or evaluated."""
    domains, fingerprints = {}, {}
    for n, src in sources.items():
        spec = data_spec(cfg, source=src, split_seed=0)
        train_records, held_records = spec.split_records()
        domains[n] = (*spec.pack(train_records, held_records, tokenizer), spec)
        fingerprints[n] = {"train": fingerprint(train_records.keys(str)), "holdout": fingerprint(held_records.keys(str))}
    return domains, fingerprints


def check_fingerprints(out: Path, fingerprints: dict[str, Any]) -> None:
    """When OUT/fingerprints.json exists (a resumed run), check that the domains are still the
    documents the run started on (ValueError naming the domain)."""
    path = out / "fingerprints.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        for name, fp in fingerprints.items():
            if recorded.get(name) != fp:
                raise ValueError(f"{out}: domain {name!r} is not the documents this run started on ({path}: "
                                 f"{recorded.get(name)}, now {fp}); start a new run")
