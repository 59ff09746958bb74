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
    from crma_jax.train.evaluate import evaluate, read_documents, token_rows
    from crma_jax.train.inference import load_for_inference

    model, variables, tokenizer = load_for_inference(args.model, args.lora, args.dtype)
    rows = token_rows(tokenizer, read_documents(args.data), args.seq_len, args.max_rows)
    result = evaluate(model, variables, rows, args.batch_size, crma_enabled=not args.no_crma)
    print(json.dumps({"model": args.model, "data": args.data, **result}, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from crma_jax.generate import generate
    from crma_jax.train.inference import load_for_inference

    model, variables, tokenizer = load_for_inference(args.model, args.lora, args.dtype)
    prompt = tokenizer(args.prompt)["input_ids"]
    if not prompt:
        raise ValueError("--prompt is empty")
    out = generate(model, variables, jnp.asarray([prompt]), args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, rng=jax.random.PRNGKey(args.seed), crma_enabled=not args.no_crma)
    print(tokenizer.decode(list(out[0, len(prompt):]), skip_special_tokens=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from crma_jax.convert.export import export_run

    written = export_run(Path(args.run), Path(args.out), args.merged)
    print(json.dumps(written, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from crma_jax.train.config import TrainConfig, config_from_args
    from crma_jax.train.finetune import train

    summary = train(config_from_args(args, TrainConfig))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from crma_jax.train.ablate import run_ablation
    from crma_jax.train.config import TrainConfig, config_from_args

    cfg = config_from_args(args, TrainConfig, {"out": "runs/ablate"})
    run_ablation(cfg)
    print((Path(cfg.out) / "ablation.md").read_text())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from crma_jax.train.demo import run_demo

    run_demo(args)
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

    def inference_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="HF dir, .gguf, crma convert output, 'smollm2', or a run dir with adapters/")
        p.add_argument("--lora", help="the LoRA set of a run dir to use (default: its last)")
        p.add_argument("--no-crma", action="store_true", help="run with CRMA switched off (same weights)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])

    p = sub.add_parser("eval", help="next-token loss and perplexity on a domain or text file")
    inference_flags(p)
    p.add_argument("--data", required=True, help="legal | code | docs, or a .txt / .jsonl file")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-rows", type=int, default=16)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="generate text with a KV cache (greedy or top-p)")
    inference_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", help="a run's adapters -> PEFT dirs, crma_adapter.safetensors, merged HF")
    p.add_argument("run", help="a crma train run dir, or RUN/<condition>/seed<s> of a crma cl run")
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--merged", action="append", metavar="SET", help="also write a merged HF checkpoint of SET")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("train", help="fine-tune LoRA (+ CRMA) on one dataset")
    add_config_flags(p, TrainConfig)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("ablate", help="stability ablation: CRMA on/off x ZClip on/off, same data and seed")
    add_config_flags(p, TrainConfig)
    p.set_defaults(fn=cmd_ablate)

    p = sub.add_parser("cl", help="continual learning over domains: NAIVE / FROZEN / MODULAR")
    add_config_flags(p, CLConfig)
    p.add_argument("--domain", action="append", help="NAME=PATH or a built-in NAME (repeat, in order)")
    p.set_defaults(fn=cmd_cl)

    from crma_jax.train.demo import add_demo_flags

    p = sub.add_parser("demo", help="SmolLM2: convert, continual learning on legal/code/docs, export to PyTorch")
    add_demo_flags(p)
    p.set_defaults(fn=cmd_demo)
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
