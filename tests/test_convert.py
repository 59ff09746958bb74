"""`crma convert`: round trip through Orbax, atomic output, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import crma_jax
from crma_jax.train.cli import main


def _no_partial_output(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_round_trip_gives_identical_logits(tmp_path, tiny_models, batch, dtype):
    ids, mask = batch
    out = tmp_path / "conv"
    assert main(["convert", str(tiny_models["gemma2"]), str(out), "--dtype", dtype]) == 0
    meta = json.loads((out / "crma_model.json").read_text())
    assert meta["format"] == "crma-jax/params" and meta["dtype"] == dtype
    m1, p1 = crma_jax.load_pretrained(tiny_models["gemma2"], dtype=dtype)
    m2, p2 = crma_jax.load_pretrained(out, dtype=dtype)
    np.testing.assert_array_equal(
        m1.apply({"params": p1}, ids, attention_mask=mask), m2.apply({"params": p2}, ids, attention_mask=mask)
    )
    _no_partial_output(tmp_path / "never")


def _corrupt(kind, src, tmp_path):
    bad = tmp_path / kind
    shutil.copytree(src, bad)
    f = bad / "model.safetensors"
    if kind == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
    elif kind == "missing_tensor":
        t = load_file(f)
        del t["model.norm.weight"]
        save_file(t, f)
    elif kind == "bad_shape":
        t = load_file(f)
        t["model.norm.weight"] = np.ones(3, np.float32)
        save_file(t, f)
    elif kind == "unknown_arch":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    elif kind == "pickle":
        f.unlink()
        (bad / "pytorch_model.bin").write_bytes(b"not even a pickle")
    return bad


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("truncated", r"model\.safetensors.*truncated"),
        ("missing_tensor", r"model\.norm\.weight"),
        ("bad_shape", r"model\.norm\.weight.*shape"),
        ("unknown_arch", r"config\.json.*gpt_neox"),
        ("pickle", r"pytorch_model\.bin.*refusing to unpickle"),
    ],
)
def test_bad_input_exits_nonzero_names_the_culprit_and_writes_nothing(kind, expected, tmp_path, tiny_models, capsys):
    bad = _corrupt(kind, tiny_models["llama"], tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(bad), str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    import re

    assert re.search(expected, err), err
    _no_partial_output(out)


def test_nonexistent_source_and_existing_output(tmp_path, tiny_models, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "nope"), str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    _no_partial_output(out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(tiny_models["llama"]), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_console_script_runs(tmp_path, tiny_models):
    """The installed `crma` entry point, in a fresh process, as a user runs it."""
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "crma_jax.train.cli", "convert", str(tiny_models["mistral"]), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "crma_model.json").exists() and (out / "params").is_dir()


def test_a_killed_converts_staging_directory_is_removed_by_the_next_one(tmp_path, tiny_models, capsys):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    orphan = tmp_path / f".out.partial-{host}-{int(dead.stdout)}-x1"  # as a killed `crma convert` leaves it
    (orphan / "out").mkdir(parents=True)
    (orphan / "out" / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".out.partial-{host}-{os.getpid()}-x2"  # a convert that is still running: not ours to touch
    live.mkdir()
    # Another machine's convert into a shared directory: its process is not visible from here.
    elsewhere = tmp_path / f".out.partial-{host}-elsewhere-{int(dead.stdout)}-x3"
    elsewhere.mkdir()
    assert main(["convert", str(tiny_models["llama"]), str(out)]) == 0
    assert not orphan.exists() and live.is_dir() and (out / "crma_model.json").is_file()
    assert f"{orphan}: removing what a killed run left behind" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, elsewhere.name])


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 1e9}, r"config.json: vocab_size x hidden_size = 1.28e\+11 elements in one weight matrix, "
                           r"more than any real model has .* is the config right\?"),
    # Plausible sizes that disagree with the tensors: named by key before a buffer of the
    # config's size (here 256 GB of embeddings) is allocated.
    ({"vocab_size": 1_000_000_000}, r"model.safetensors: tensor 'model.embed_tokens.weight' has shape \(\d+, 64\), "
                                    r"expected \(1000000000, 64\)"),
    ({"num_hidden_layers": 100_000}, r"src: missing tensor 'model\.layers\.2\."),
])
def test_an_absurd_config_is_bad_input_naming_the_file_and_key(change, message, tmp_path, tiny_models, capsys):
    import re

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
