"""The `crma` command line: one entry point, one subcommand per program."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from crma_jax.convert.smollm2 import resolve_model_path
from crma_jax.errors import CheckpointError


def _mesh(spec: str | None):
    if not spec:
        return None
    from crma_jax.sharding import make_mesh

    return make_mesh([int(x) for x in spec.split(",")])


def cmd_convert(args: argparse.Namespace) -> int:
    from crma_jax.convert.convert import convert_checkpoint

    out = convert_checkpoint(
        resolve_model_path(args.src), args.out, dtype=args.dtype, mesh=_mesh(args.mesh), allow_pickle=args.allow_pickle
    )
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from crma_jax.pretrained import load_pretrained, load_tokenizer
    from crma_jax.train.evaluate import evaluate, read_documents, token_rows

    path = resolve_model_path(args.model)
    model, params = load_pretrained(path, dtype=args.dtype)
    rows = token_rows(load_tokenizer(path), read_documents(args.data), args.seq_len, args.max_rows)
    result = evaluate(model, {"params": params}, rows, args.batch_size)
    print(json.dumps({"model": args.model, "data": args.data, **result}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from crma_jax.train.config import TrainConfig, config_from_args
    from crma_jax.train.finetune import train

    summary = train(config_from_args(args, TrainConfig))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_cl(args: argparse.Namespace) -> int:
    from crma_jax.train.config import config_from_args
    from crma_jax.train.continual import CLConfig, run_continual

    cfg = config_from_args(args, CLConfig, {"domains": ",".join(args.domain)} if args.domain else None)
    payload = run_continual(cfg)
    print((Path(cfg.out) / "results.md").read_text())
    print(f"results: {Path(cfg.out) / 'results.json'}")
    return 0 if payload else 1


def build_parser() -> argparse.ArgumentParser:
    from crma_jax.train.config import TrainConfig, add_config_flags
    from crma_jax.train.continual import CLConfig

    parser = argparse.ArgumentParser(prog="crma", description="CRMA adapters for JAX/Flax decoders")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF directory or .gguf -> crma-jax params checkpoint (Orbax)")
    p.add_argument("src", help="HF model directory, .gguf file, or 'smollm2'")
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", help="place params on a D,F,M (data,fsdp,model) mesh while converting")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin weights with torch.load(weights_only=True)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("eval", help="next-token loss and perplexity on a domain or text file")
    p.add_argument("model", help="HF directory, .gguf file, crma convert output, or 'smollm2'")
    p.add_argument("--data", required=True, help="legal | code | docs, or a .txt / .jsonl file")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("train", help="fine-tune LoRA (+ CRMA) on one dataset")
    add_config_flags(p, TrainConfig)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("cl", help="continual learning over domains: NAIVE / FROZEN / MODULAR")
    add_config_flags(p, CLConfig)
    p.add_argument("--domain", action="append", help="NAME=PATH or a built-in NAME (repeat, in order)")
    p.set_defaults(fn=cmd_cl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"crma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crma {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
