"""The `crma` command line: one entry point, one subcommand per program.

Errors: bad input (a missing file, a bad setting, a corrupt checkpoint) prints one line naming
the culprit and exits with 2; a failure of the machine (a full disk, a permission) prints one
line and exits with 1; any other error prints one line and exits with 1, with a hint that
`--debug` prints the traceback as well. A stop signal (Ctrl-C, SIGTERM, SIGUSR1) during training saves a
checkpoint at the next step boundary and exits with 128 + its number: 130, 143, 138 (`stops`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from crma_jax.convert.hub import resolve_model_path
from crma_jax.host import cpu_only
from crma_jax.train.stops import Stopped

# Exit 2 ("bad input", no traceback hint): a missing or existing path, an error class of the
# project's own, or a ValueError / RuntimeError that the project's own code raised (its messages
# name the flag, file or step). The same classes raised inside a library (jax's out-of-memory
# JaxRuntimeError, a ValueError deep in numpy) are internal errors: exit 1 with the --debug hint.
# Only the plain classes count, by where they were raised: jax removes its own frames from the
# traceback of an error in a jitted call, so a JaxRuntimeError seems raised by the caller.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError)
RAISED_BY_US = (ValueError, RuntimeError)
PACKAGES = ("crma_jax", "crma_jax.train", "crma_jax.convert")


def is_bad_input(e: BaseException) -> bool:
    """Whether `e` is the project's own report of bad input (see PATH_ERRORS above)."""
    if isinstance(e, PATH_ERRORS) or type(e).__module__.split(".")[0] == "crma_jax":
        return True
    if type(e) not in RAISED_BY_US:  # a library's subclass (jax's JaxRuntimeError) is the library's
        return False
    frames = traceback.extract_tb(e.__traceback__)
    roots = [Path(sys.modules[m].__file__).parent for m in PACKAGES if m in sys.modules]
    return bool(frames) and any(Path(frames[-1].filename).is_relative_to(r) for r in roots)
# `crma bench NAME`: each module has add_flags(parser) and run(args) -> exit status.
BENCHMARKS = {
    "convert": ("crma_jax.train.bench.convert", "SmolLM2 load/convert time and peak RSS vs safetensors and transformers"),
    "crma": ("crma_jax.train.bench.crma", "CRMA's forward cost and parameter counts"),
    "train": ("crma_jax.train.bench.train", "training throughput, ours vs PEFT, with a profile"),
    "qlora": ("crma_jax.train.bench.qlora", "peak RSS of one QLoRA step, NF4 vs bf16 base (TinyLlama shapes)"),
    "load": ("crma_jax.train.bench.load", "peak memory of a streaming NF4 load vs load-then-quantize"),
    "memory": ("crma_jax.train.bench.memory", "plan a training step's memory from abstract shapes (no weights)"),
}


def _mesh(spec: str | None):
    if not spec:
        return None
    from crma_jax.sharding import make_mesh

    try:
        shape = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--mesh must be D,F,M integers, got {spec!r}") from None
    return make_mesh(shape)


def cmd_convert(args: argparse.Namespace) -> int:
    from crma_jax.convert.convert import convert_checkpoint

    out = convert_checkpoint(
        resolve_model_path(args.src), args.out, dtype=args.dtype, mesh=_mesh(args.mesh), allow_pickle=args.allow_pickle
    )
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from crma_jax.train.evaluate import run_eval

    print(json.dumps(run_eval(args), indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from crma_jax.chat import chat_prompt, reply
    from crma_jax.generate import generate
    from crma_jax.train.inference import load_for_inference

    model, variables, tokenizer = load_for_inference(args.model, args.lora, args.dtype)
    if not args.prompt:
        raise ValueError("--prompt is empty")
    prompt = chat_prompt(tokenizer, args.prompt) if args.chat else tokenizer(args.prompt)["input_ids"]
    out = generate(model, variables, jnp.asarray([prompt]), args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, rng=jax.random.PRNGKey(args.seed), crma_enabled=not args.no_crma)
    new = [int(t) for t in out[0, len(prompt):]]
    if args.chat:
        new = reply(tokenizer, new)
    print(tokenizer.decode(new, skip_special_tokens=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from crma_jax.convert.export import export_run

    written = export_run(Path(args.run), Path(args.out), args.merged)
    print(json.dumps(written, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from crma_jax.train.config import TrainConfig, config_from_args

    cfg = config_from_args(args, TrainConfig)
    if cfg.compile_only:
        from crma_jax.train.compile_only import compile_only

        compile_only(cfg)
        return 0
    from crma_jax.train.finetune import train

    summary = train(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from crma_jax.train.ablate import AblateConfig, run_ablation
    from crma_jax.train.config import config_from_args

    cfg = config_from_args(args, AblateConfig)
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


def cmd_cl_table(args: argparse.Namespace) -> int:
    from crma_jax.train.cl_table import cl_plots, cl_table
    from crma_jax.train.config import RENAMED

    settings = [RENAMED.get(k, k) for k in args.settings.split(",")] if args.settings else None
    table = cl_table(args.runs, settings, args.versus.split(",") if args.versus else ())
    plots = cl_plots(args.runs, args.plots, settings) if args.plots else []
    print(table, end="")
    for path in plots:
        print(f"plot: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from crma_jax.train.report import write_report

    print(f"wrote {write_report(args.run, args.out)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.bench][0]).run(args)


def build_parser(words: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `crma` parser. Every command is listed; with `words` (the command line's first two
    words that are no option), only the command they name, and for `bench` the benchmark, gets
    its flags, so that `crma -h` or `crma cl-table` imports neither jax nor the other programs.
    None: every flag."""

    def wanted(*names: str) -> bool:
        return words is None or list(words[:len(names)]) == list(names)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    parser = argparse.ArgumentParser(prog="crma", description="CRMA adapters for JAX/Flax decoders", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, fn: Callable[[argparse.Namespace], int],
                flags: Callable[[argparse.ArgumentParser], None]) -> None:
        # No abbreviations: `--seed` must not quietly mean `--seeds`, nor `--lr` one of the LRs.
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common], allow_abbrev=False)
        if wanted(name):
            flags(p)
        p.set_defaults(fn=fn)

    def convert_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("src", help="HF model directory, .gguf file, or 'smollm2'")
        p.add_argument("out", help="output directory (must not exist)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="storage dtype (default: %(default)s)")
        p.add_argument("--mesh", help="place params on a D,F,M (data,fsdp,model) mesh while converting (default: one device)")
        p.add_argument("--allow-pickle", action="store_true",
                       help="load .bin weights with torch.load(weights_only=True); refused by default")

    def inference_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="HF dir, .gguf, crma convert output, 'smollm2', or a run dir with adapters/")
        p.add_argument("--lora", help="the LoRA set of a run dir to use (default: its last trained set)")
        p.add_argument("--no-crma", action="store_true", help="run with CRMA switched off (same weights)")
        p.add_argument("--dtype", choices=["float32", "bfloat16"],
                       help="storage dtype (default: the run's, or float32 for a model)")

    def eval_flags(p: argparse.ArgumentParser) -> None:
        from crma_jax.train.evaluate import add_eval_flags

        inference_flags(p)
        add_eval_flags(p)

    def generate_flags(p: argparse.ArgumentParser) -> None:
        inference_flags(p)
        p.add_argument("--prompt", required=True, help="the text to continue, or with --chat the user's message")
        p.add_argument("--chat", action="store_true",
                       help="wrap --prompt as one user turn in the tokenizer's chat template and print the assistant's "
                            "reply, up to its end-of-turn token")
        p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: %(default)s)")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
        p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")

    def export_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("run", help="a crma train run dir, or RUN/<condition>/seed<s> of a crma cl run")
        p.add_argument("out", help="output directory (must not exist)")
        p.add_argument("--merged", action="append", metavar="SET",
                       help="also write a merged HF checkpoint of this LoRA set (repeatable)")

    def config_flags(module: str, config: str) -> Callable[[argparse.ArgumentParser], None]:
        def flags(p: argparse.ArgumentParser) -> None:
            from crma_jax.train.config import add_config_flags

            add_config_flags(p, getattr(importlib.import_module(module), config))
        return flags

    def cl_flags(p: argparse.ArgumentParser) -> None:
        config_flags("crma_jax.train.continual", "CLConfig")(p)
        p.add_argument("--domain", action="append", metavar="NAME[=PATH]",
                       help="a domain in training order, a built-in NAME or NAME=PATH (repeat; overrides `domains`)")

    def cl_table_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("runs", nargs="+", type=Path, help="finished `crma cl` run directories")
        p.add_argument("--settings", help="comma-separated config keys to show (default: those that differ between runs)")
        p.add_argument("--versus", metavar="CONDITION[,CONDITION...]",
                       help="add each row's mean losses relative to each CONDITION's (e.g. frozen,frozen_substrate), "
                            "paired per seed")
        p.add_argument("--plots", type=Path, metavar="DIR",
                       help="also draw the pooled heatmaps, drift and mean loss/BWT plots into DIR (new or empty)")

    def report_flags(p: argparse.ArgumentParser) -> None:
        from crma_jax.train.report import add_report_flags

        add_report_flags(p)

    def demo_flags(p: argparse.ArgumentParser) -> None:
        from crma_jax.train.demo import add_demo_flags

        add_demo_flags(p)

    def bench_flags(p: argparse.ArgumentParser) -> None:
        benches = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
        for name, (module, help_text) in BENCHMARKS.items():
            b = benches.add_parser(name, help=help_text, description=help_text, parents=[common])
            if wanted("bench", name):
                importlib.import_module(module).add_flags(b)

    command("convert", "HF directory or .gguf -> crma-jax params checkpoint (Orbax)", cmd_convert, convert_flags)
    command("eval", "next-token loss and perplexity (default: a run's own holdout split)", cmd_eval, eval_flags)
    command("generate", "generate text with a KV cache (greedy or top-p)", cmd_generate, generate_flags)
    command("export", "a run's adapters -> PEFT dirs, crma_adapter.safetensors, merged HF", cmd_export, export_flags)
    command("train", "fine-tune LoRA (+ CRMA) on one dataset", cmd_train, config_flags("crma_jax.train.config", "TrainConfig"))
    command("ablate", "stability ablation: CRMA on/off x ZClip on/off, same data and seed", cmd_ablate,
            config_flags("crma_jax.train.ablate", "AblateConfig"))
    command("cl", "continual learning over domains: NAIVE, FROZEN, MODULAR, REPLAY, EWC, O-LoRA, InfLoRA", cmd_cl, cl_flags)
    command("cl-table", "markdown tables comparing finished `crma cl` runs (settings, losses, substrate); "
                        "runs with the same settings pool their seeds", cmd_cl_table, cl_table_flags)
    command("report", "one self-contained HTML page of a finished run: settings, summary tables, plots", cmd_report,
            report_flags)
    command("demo", "SmolLM2: convert, continual learning on legal/code/docs, export to PyTorch", cmd_demo, demo_flags)
    command("bench", "benchmarks: print what they measure, with the command and the machine", cmd_bench, bench_flags)
    return parser


def _not_orbax(record: logging.LogRecord) -> bool:
    """False for Orbax's own log records, and for asyncio's reports of Orbax's futures that a
    failed save abandoned ("exception was never retrieved", logged when they are collected)."""
    def orbax(path: str) -> bool:
        return "/orbax/" in path.replace("\\", "/")

    if orbax(record.pathname):
        return False
    if record.name == "asyncio" and record.exc_info:
        _, error, frames = record.exc_info
        if frames is None:  # raised by tensorstore, whose C++ leaves no frames: its message names Orbax's files
            return ".orbax-checkpoint-tmp" not in str(error)
        return not any(orbax(frame.filename) for frame in traceback.extract_tb(frames))
    return True


class _QuietClosedLoop:
    """`sys.unraisablehook` that drops tensorstore's late completions of a failed asynchronous save.

    When one of Orbax's writes fails, its event loop closes while tensorstore's other writes are
    still in flight; each of their completions then reports `RuntimeError('Event loop is closed')`
    as unraisable, one traceback per write, during the run and at exit. With `on` false, and for
    everything else, the hook that was installed before (Python's, or pytest's) gets it."""

    def __init__(self, then):
        self.then, self.on = then, True

    def __call__(self, unraisable) -> None:
        e = unraisable.exc_value
        if self.on and isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        self.then(unraisable)

    @classmethod
    def install(cls, on: bool) -> None:
        """Idempotent: a second `main` in one process switches the installed filter."""
        if not isinstance(sys.unraisablehook, cls):
            sys.unraisablehook = cls(sys.unraisablehook)
        sys.unraisablehook.on = on


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command and benchmark names: the first words that are no option (above a benchmark's
    # own flags there are only -h and --debug, which take no value).
    if "JAX_PLATFORMS" not in os.environ and cpu_only():  # before jax is imported (a command's flags may)
        os.environ["JAX_PLATFORMS"] = "cpu"  # JAX's own choice here, without its plugins' tracebacks
    args = build_parser([a for a in argv if not a.startswith("-")][:2]).parse_args(argv)
    name = f"crma {args.command}"
    # A failed asynchronous save makes Orbax log its traceback from every thread (hundreds of
    # lines); the failure reaches the program as one `SaveFailed` line. --debug keeps them.
    loggers = [logging.getLogger(logger) for logger in ("absl", "asyncio")]
    for logger in loggers:
        logger.removeFilter(_not_orbax)
    _QuietClosedLoop.install(on=not args.debug)
    if not args.debug:
        for logger in loggers:
            logger.addFilter(_not_orbax)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Stopped as e:  # a stop signal, taken at a step boundary after saving
        print(f"{name}: {e}", file=sys.stderr)
        return e.exit_status
    except Exception as e:  # noqa: BLE001 - the one place that turns any error into an exit status
        if args.debug:
            traceback.print_exc()
        if isinstance(e, OSError) and not isinstance(e, PATH_ERRORS):  # the machine's: a full disk, permissions
            print(f"{name}: error: {e}", file=sys.stderr)
            return 1
        known = is_bad_input(e)
        hint = "" if args.debug else " (run again with --debug for the traceback)"
        print(f"{name}: error: {e}" if known else f"{name}: internal error: {type(e).__name__}: {e}{hint}",
              file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
