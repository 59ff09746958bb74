"""The inference and export subcommands on a tiny trained run: eval, generate, export."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from crma_jax.train.cli import main


@pytest.fixture(scope="module")
def trained(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"note {i}: the quick brown fox jumps over the lazy dog"}) for i in range(30)))
    run = root / "run"
    assert main(["train", "--model", str(tiny_lm), "--data", str(data), "--out", str(run), "--steps", "4",
                 "--warmup-steps", "1", "--seq-len", "32", "--batch-size", "4", "--eval-every", "4",
                 "--no-plots", "--report-to", "none", "--mesh", "1,1,1"]) == 0
    return run, data


def test_eval_of_a_run_defaults_to_its_own_holdout_and_reproduces_its_loss(trained, capsys):
    run, data = trained
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert result["split"] == "holdout" and result["data"]["source"] == str(data) and result["data"]["seq_len"] == 32
    assert result["loss"] == pytest.approx(summary["holdout_loss"], rel=1e-6)
    assert result["tokens"] > 0


def test_eval_base_and_run_with_and_without_crma(trained, tiny_lm, capsys):
    run, data = trained
    results = {}
    for name, argv in {"base": [str(tiny_lm)], "run": [str(run)], "run_no_crma": [str(run), "--no-crma"]}.items():
        assert main(["eval", *argv, "--data", str(data), "--seq-len", "32", "--split", "all"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert all(r["tokens"] > 0 and r["perplexity"] > 1 for r in results.values())
    assert len({r["tokens"] for r in results.values()}) == 1  # the same tokens, each counted once
    assert len({round(r["loss"], 6) for r in results.values()}) == 3  # LoRA and CRMA each change the loss


def test_generate_greedy_is_deterministic(trained, capsys):
    run, _ = trained
    outs = []
    for _ in range(2):
        assert main(["generate", str(run), "--prompt", "the quick", "--max-new-tokens", "6"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_export_writes_peft_and_crma_and_refuses_existing_out(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "export"
    assert main(["export", str(run), str(out), "--merged", "default"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert set(listing) == {"peft_default", "crma", "merged_default"}
    config = json.loads((out / "peft_default" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    tensors = load_file(out / "peft_default" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert (out / "merged_default" / "model.safetensors").exists()
    assert main(["export", str(run), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "x"), "--merged", "nope"]) == 2
    assert "no LoRA set" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_errors_name_the_culprit(trained, tiny_lm, tmp_path, capsys):
    run, data = trained
    assert main(["eval", str(tiny_lm), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["eval", str(tiny_lm), "--lora", "x", "--data", str(data)]) == 2
    assert "run directory" in capsys.readouterr().err
    assert main(["eval", str(tiny_lm)]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["eval", str(run), "--lora", "nope"]) == 2
    assert "no LoRA set 'nope'" in capsys.readouterr().err


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_flag_of_every_subcommand_has_help_with_its_default():
    from crma_jax.train.cli import build_parser

    checked = 0
    stack = list(_subparsers(build_parser()))
    while stack:
        name, parser = stack.pop()
        stack.extend((f"{name} {n}", p) for n, p in _subparsers(parser))
        for action in parser._actions:
            if not action.option_strings or action.help == "==SUPPRESS==" or action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, f"crma {name} {action.option_strings}: no help"
            # One vocabulary: every command says --batch-size and --seq-len.
            assert not {"--batch", "--seq"} & set(action.option_strings), f"crma {name} {action.option_strings}"
            takes_value = action.nargs != 0 and not isinstance(action.default, bool)
            if takes_value and action.default is not None and not action.required:
                assert "default" in action.help, f"crma {name} {action.option_strings}: default not shown"
            checked += 1
    assert checked > 100


def test_domain_flags_override_the_yaml_domains(tmp_path):
    from crma_jax.train.cli import build_parser
    from crma_jax.train.config import config_from_args
    from crma_jax.train.continual import CLConfig

    config = tmp_path / "cl.yaml"
    config.write_text("domains: legal,code\nsteps: 7\n")
    args = build_parser().parse_args(["cl", "--config", str(config), "--domain", "docs", "--domain", "x=/data/x.jsonl"])
    cfg = config_from_args(args, CLConfig, {"domains": ",".join(args.domain)})
    assert cfg.domains == "docs,x=/data/x.jsonl" and cfg.steps == 7
    config.write_text("data: legal\neval_data: x.jsonl\n")
    with pytest.raises(ValueError, match=r"unknown settings \['data', 'eval_data'\]"):
        config_from_args(build_parser().parse_args(["cl", "--config", str(config)]), CLConfig)
    with pytest.raises(SystemExit):  # one eval set for every domain would make L's columns the same set
        build_parser().parse_args(["cl", "--eval-data", "x.jsonl"])


def test_unexpected_errors_print_one_line_and_the_traceback_with_debug(trained, monkeypatch, capsys):
    import crma_jax.train.evaluate as evaluate_program

    run, _ = trained

    def broken(args):
        raise TypeError("boom")

    monkeypatch.setattr(evaluate_program, "run_eval", broken)
    assert main(["eval", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["crma eval: internal error: TypeError: boom (run again with --debug for the traceback)"]
    assert main(["eval", str(run), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "TypeError: boom" in err


def test_exit_2_is_only_for_the_projects_own_input_errors(trained, monkeypatch, capsys):
    """An out-of-memory JaxRuntimeError (a RuntimeError) or a ValueError raised inside a library is
    an internal error (exit 1, with the --debug hint); the project's own ValueErrors exit 2."""
    import jax
    import numpy as np

    import crma_jax.train.evaluate as evaluate_program

    run, _ = trained

    def out_of_memory(args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    def library_value_error(args):
        return np.zeros(3).reshape(2, 2)

    for broken in (out_of_memory, library_value_error):
        monkeypatch.setattr(evaluate_program, "run_eval", broken)
        assert main(["eval", str(run)]) == 1
        err = capsys.readouterr().err
        assert "internal error" in err and "--debug" in err
    monkeypatch.undo()
    # The same error from inside a jitted call that crma_jax makes: jax filters its own frames
    # out of the traceback, so the last frame left is crma_jax's.
    import functools

    import jax.numpy as jnp

    import crma_jax.evaluate as evaluate_library

    def allocate(ids):
        raise MemoryError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    @functools.partial(jax.jit, static_argnames=("model", "crma_enabled"))
    def token_nll(model, variables, batch, crma_enabled):
        ids = batch["input_ids"]
        return jax.pure_callback(allocate, jax.ShapeDtypeStruct(ids.shape, jnp.float32), ids)

    monkeypatch.setattr(evaluate_library, "batch_token_nll", token_nll)
    assert main(["eval", str(run)]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "RESOURCE_EXHAUSTED" in err
    monkeypatch.undo()
    assert main(["eval", str(run), "--lora", "nope"]) == 2  # the project's own report of bad input
    assert "internal error" not in capsys.readouterr().err


def test_benchmarks_are_subcommands_that_import_without_side_effects():
    """Importing a benchmark changes no environment variable and patches no library module."""
    import subprocess
    import sys

    code = (
        "import os, importlib, jax.numpy as jnp\n"
        "before = dict(os.environ)\n"
        "import crma_jax.layers as layers\n"
        "from crma_jax.train.cli import BENCHMARKS, build_parser\n"
        "for module, _ in BENCHMARKS.values(): importlib.import_module(module)\n"
        "build_parser()\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "assert layers.jnp is jnp\n"
        "print(sorted(BENCHMARKS))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['convert', 'crma', 'load', 'memory', 'qlora', 'train']"


def test_help_starts_no_jax():
    """`crma -h` and a command's list of benchmarks import no jax, flax or torch (nor print the CUDA
    plugin's notices); a command's own flags load only that command's modules."""
    import subprocess
    import sys

    code = (
        "import contextlib, io, sys\n"
        "from crma_jax.train.cli import main\n"
        "for argv in (['-h'], ['bench', '-h']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    assert 'COMMAND' in out.getvalue() or 'BENCHMARK' in out.getvalue(), out.getvalue()\n"
        "print(sorted(m for m in ('jax', 'flax', 'torch', 'crma_jax.train.continual') if m in sys.modules))\n"
        "print('-- jax from here on', file=sys.stderr, flush=True)\n"
        "from crma_jax.train.cli import build_parser\n"
        "build_parser(['cl'])\n"
        "print('crma_jax.train.continual' in sys.modules, 'crma_jax.train.bench.memory' in sys.modules)\n"
        "import crma_jax\n"  # the package's submodules and exports are there on first use
        "assert callable(crma_jax.pretrained.load_tokenizer) and crma_jax.sinkhorn.__name__ == 'sinkhorn'\n"
        "main(['bench', '--debug', 'memory', '--arch', 'tinyllama', '--target', 'nope'])\n"  # flags after --debug
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["[]", "True False"] and out.stderr.startswith("-- jax from here on")
    assert "unknown --target 'nope'" in out.stderr and "unrecognized arguments" not in out.stderr


def test_no_environment_switch_can_kill_a_run():
    """Faults are injected by tests from outside (tests/fault_injection.py), never read from the
    environment by the programs."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("crma_jax", "train", "convert") for p in (root / d).rglob("*.py")]
    assert sources
    offenders = [str(p) for p in sources if "CRMA_TEST" in p.read_text() or "SIGKILL" in p.read_text()]
    assert not offenders


def test_eval_with_data_splits_with_the_runs_own_seed(trained, tiny_lm, tmp_path, capsys):
    """A run trained with --seed 3, a 30% holdout of its first 20 documents, split its data so:
    `crma eval RUN --data SAME` must score that run's holdout, not seed 0's 10% of every document
    (which holds training documents of the run)."""
    _, data = trained
    run = tmp_path / "seed3"
    assert main(["train", "--model", str(tiny_lm), "--data", str(data), "--out", str(run), "--steps", "2", "--seed", "3",
                 "--holdout-fraction", "0.3", "--max-documents", "20", "--warmup-steps", "1", "--seq-len", "32",
                 "--batch-size", "4", "--eval-every", "0", "--no-plots", "--report-to", "none", "--mesh", "1,1,1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--data", str(data), "--seq-len", "32"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["data"]["split_seed"], again["data"]["holdout_fraction"], again["data"]["max_documents"]) == (3, 0.3, 20)
    assert again["tokens"] == own["tokens"] and again["loss"] == pytest.approx(own["loss"], rel=1e-6)
    assert main(["eval", str(run), "--data", str(data), "--seq-len", "32", "--split-seed", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["split_seed"] == 0  # asked for: still possible
    # A run with separate evaluation data trained on all of --data: none of it is a holdout.
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"text": f"held-out note {i}: a slow red fox"}) for i in range(8)))
    separate = tmp_path / "separate"
    assert main(["train", "--model", str(tiny_lm), "--data", str(data), "--eval-data", str(held), "--out", str(separate),
                 "--steps", "1", "--warmup-steps", "0", "--seq-len", "32", "--batch-size", "4", "--eval-every", "0",
                 "--no-plots", "--report-to", "none", "--mesh", "1,1,1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(separate), "--data", str(data)]) == 2
    assert f"trained on all of {data} (its holdout was --eval-data" in capsys.readouterr().err
    assert main(["eval", str(separate), "--data", str(data), "--split", "train"]) == 0


def _complete_after_the_loop_closed() -> None:
    """What a failed Orbax save leaves behind: a tensorstore future that completes after the
    event loop awaiting it was closed."""
    import asyncio

    import tensorstore as ts

    promise, future = ts.Promise.new()

    async def wait_briefly():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), 0.01)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(wait_briefly())
    loop.close()
    promise.set_result(0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_late_completions_of_a_failed_save_are_quiet_unless_debug(monkeypatch):
    import sys

    from crma_jax.train.cli import _QuietClosedLoop

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    _QuietClosedLoop.install(on=True)
    _complete_after_the_loop_closed()
    assert seen == []
    _QuietClosedLoop.install(on=False)  # --debug
    _complete_after_the_loop_closed()
    assert seen == ["Event loop is closed"]
    sys.unraisablehook(type("U", (), {"exc_value": ValueError("other")})())
    assert seen[-1] == "other"


def test_asyncio_reports_of_a_failed_saves_futures_are_dropped_and_others_kept(tmp_path, monkeypatch, caplog):
    """A failed Orbax save leaves futures whose exception nobody retrieves; asyncio logs each when
    it is collected. Those whose traceback runs through Orbax are dropped, others are kept."""
    import asyncio
    import gc
    import logging

    from crma_jax.train.cli import _not_orbax

    (tmp_path / "orbax").mkdir()
    (tmp_path / "orbax" / "fake_save.py").write_text("async def write():\n    raise ValueError('disk full')\n")
    (tmp_path / "elsewhere.py").write_text("async def write():\n    raise ValueError('ours')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "orbax"))
    import elsewhere
    import fake_save

    def abandon(write) -> None:
        async def start():
            asyncio.gather(write())  # never awaited: its exception is never retrieved
            await asyncio.sleep(0.01)

        loop = asyncio.new_event_loop()
        loop.run_until_complete(start())
        loop.close()
        gc.collect()

    gc.collect()  # what earlier tests left behind is reported now, not below
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "filters", [])
    asyncio_log.addFilter(_not_orbax)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        abandon(fake_save.write)
        assert not [r for r in caplog.records if r.name == "asyncio" and "never retrieved" in r.getMessage()]
        abandon(elsewhere.write)
        assert [r for r in caplog.records if r.name == "asyncio" and "never retrieved" in r.getMessage()]

    # tensorstore's exceptions come from C++ with no Python frames: Orbax's temporary path names them.
    def report(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, "Future exception was never retrieved",
                                 None, (ValueError, ValueError(message), None))

    assert not _not_orbax(report('OUT_OF_RANGE: Error writing "rng/0" at "run/checkpoints/20.orbax-checkpoint-tmp/d"'))
    assert _not_orbax(report("OUT_OF_RANGE: a write of our own"))
