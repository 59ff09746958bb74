"""`crma eval MODEL_OR_RUN`: next-token loss and perplexity, on the library's one evaluation path.

For a run directory the default data is the run's own holdout split, rebuilt from the data spec
recorded with its adapters, so `crma eval RUN` reproduces the run's final holdout loss. `--data`
evaluates any built-in domain or file instead, split the same way (`--split` picks the holdout,
the training part, or all of it). Every target token is counted exactly once.
"""

from __future__ import annotations

import argparse
from typing import Any

from crma_jax.adapter_files import load_adapters, recorded_path
from crma_jax.data import DataSpec
from crma_jax.evaluate import EvalResult, evaluate
from crma_jax.progress import progress_callback
from crma_jax.train.config import DATA_SETTINGS, TrainConfig, add_config_flags, config_from_args
from crma_jax.train.finetune import data_spec
from crma_jax.train.inference import is_run, load_for_inference, pick_set

SPLITS = ("holdout", "train", "all")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="data to score (what `crma train --data` takes: a built-in domain, a file, a saved or "
                                  "cached datasets dataset), split as a run split its own data (its split seed, "
                                  "holdout fraction and document cap) unless flags say otherwise; default for a run: "
                                  "the run's own holdout")
    p.add_argument("--split", choices=SPLITS, default="holdout",
                   help="which part of the data to score (default: %(default)s)")
    p.add_argument("--seq-len", type=int, help="tokens per row with --data (default: the run's, else 256)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (default: %(default)s)")
    p.add_argument("--split-seed", type=int,
                   help="with --data: seed of the document-level split (default: a run's own split seed, so that "
                        "its holdout holds no training document; for a model, 0)")
    add_config_flags(p, TrainConfig, only=DATA_SETTINGS)  # with --data: how its records are read


def eval_spec(args: argparse.Namespace, set_name: str | None) -> DataSpec:
    """The data spec to score: `--data` with its flags, else the run's recorded spec for the set."""
    recorded = load_adapters(args.model).data.get(set_name or "", {}) if is_run(args.model) else {}
    if args.data:
        if recorded.get("eval_source") and args.split == "holdout" and recorded_path(args.data) == recorded["source"]:
            raise ValueError(f"{args.model}: trained on all of {args.data} (its holdout was --eval-data "
                             f"{recorded['eval_source']}), so no part of it is held out; `crma eval {args.model}` "
                             "scores that holdout, --split train or all scores this data")
        # Split as the run split its own data, unless a flag says otherwise: its seed, holdout
        # fraction and document cap (another split would put its training documents in the holdout).
        seed = args.split_seed if args.split_seed is not None else recorded.get("split_seed", 0)
        split = {k: recorded[k] for k in ("holdout_fraction", "max_documents")
                 if recorded.get(k) is not None and getattr(args, k) is None}
        cfg = config_from_args(args, TrainConfig, {"data": args.data, "seq_len": args.seq_len or recorded.get("seq_len")
                                                   or 256, "seed": seed, **split})
        return data_spec(cfg)
    if not is_run(args.model):
        raise ValueError(f"{args.model}: --data is required for a model (only a run directory knows its data)")
    if not recorded:
        raise ValueError(f"{args.model}: LoRA set {set_name!r} records no data spec; pass --data")
    spec = DataSpec(**recorded)
    return DataSpec(**{**spec.as_dict(), "seq_len": args.seq_len}) if args.seq_len else spec


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Load, build the split, evaluate; returns the JSON-able report."""
    set_name = pick_set(load_adapters(args.model), args.model, args.lora) if is_run(args.model) else args.lora
    spec = eval_spec(args, set_name)
    model, variables, tokenizer = load_for_inference(args.model, set_name, args.dtype)
    train_rows, holdout_rows = spec.build(tokenizer, vocab_size=model.config.vocab_size)
    parts = {"holdout": [holdout_rows], "train": [train_rows], "all": [train_rows, holdout_rows]}[args.split]
    total = EvalResult(0.0, 0)
    for rows in parts:
        r = evaluate(model, variables, rows, args.batch_size, crma_enabled=not args.no_crma,
                     progress=progress_callback("eval", unit="batch"))
        total = EvalResult(total.nll_sum + r.nll_sum, total.tokens + r.tokens)
    return {"model": args.model, "lora": set_name, "crma": "crma" in variables and not args.no_crma,
            "data": spec.as_dict(), "split": args.split, **total.as_dict()}
