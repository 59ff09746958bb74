"""`crma ablate`: four arms x seeds on a tiny model; the arms of one seed start alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import word_jsonl

from crma_jax.train.cli import main
from crma_jax.train.metrics import read_metrics

ARMS = ("crma+zclip", "crma", "zclip", "plain")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return word_jsonl(tmp_path_factory.mktemp("ablate_data") / "notes.jsonl",
                      "the tenant shall keep the premises in good repair and pay the rent")


@pytest.fixture(scope="module")
def ablated(tiny_lm, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "run"
    argv = ["ablate", "--model", str(tiny_lm), "--data", str(data), "--out", str(out), "--steps", "5",
            "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "1", "--lora-rank", "4", "--zclip-warmup", "2",
            "--lr-lora", "2e-2", "--lr-crma-read-mix", "5e-2", "--eval-every", "5", "--seeds", "0,1",
            "--no-plots", "--report-to", "none", "--mesh", "1,1,1"]
    assert main(argv) == 0
    return out, json.loads((out / "ablation.json").read_text())


def test_every_arm_and_seed_is_summarised(ablated):
    out, payload = ablated
    assert payload["seeds"] == [0, 1] and set(payload["runs"]) == set(ARMS)
    for arm in ARMS:
        runs = payload["runs"][arm]
        assert set(runs) == {"0", "1"}
        for col in ("peak_grad_norm", "mean_grad_norm", "final_loss", "holdout_loss"):
            values = [runs[s][col] for s in ("0", "1")]
            stats = payload["summary"][arm][col]
            assert stats["mean"] == pytest.approx(np.mean(values)) and stats["std"] == pytest.approx(np.std(values, ddof=1)) and stats["n"] == 2
            assert stats["min"] == min(values) and stats["max"] == max(values)
        records = read_metrics(out / arm / "seed1")
        assert len(records) == 5 and runs["1"]["peak_grad_norm"] == max(r["grad_norm"] for r in records)
        if "zclip" not in arm:
            assert all(runs[s]["clip_count"] == 0 for s in ("0", "1"))
    table = (out / "ablation.md").read_text()
    assert all(f"| {arm} |" in table for arm in ARMS) and "seeds [0, 1]" in table
    assert (out / "grad_norm_overlay.png").stat().st_size > 0


def test_arms_of_one_seed_start_alike_and_seeds_differ(ablated):
    out, _ = ablated
    first = {(arm, s): read_metrics(out / arm / f"seed{s}")[0]["loss"] for arm in ARMS for s in (0, 1)}
    for s in (0, 1):
        # ZClip only changes updates: the first loss is identical with and without it.
        assert first[("crma+zclip", s)] == first[("crma", s)] and first[("zclip", s)] == first[("plain", s)]
        # CRMA starts at (nearly) the identity on the same LoRA draw and data.
        assert first[("crma", s)] == pytest.approx(first[("plain", s)], rel=1e-3)
    assert first[("plain", 0)] != first[("plain", 1)]  # another seed: another LoRA draw and data order


def test_bad_seeds_are_refused(tiny_lm, data, tmp_path, capsys):
    assert main(["ablate", "--model", str(tiny_lm), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--seeds", "0,0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):  # every arm sets the seed itself
        main(["ablate", "--model", str(tiny_lm), "--data", str(data), "--seed", "3"])
