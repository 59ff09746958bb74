"""`crma cl` bookkeeping on a tiny model with three synthetic domains, and resume after a kill."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from crma_jax.convert.export import export_run
from crma_jax.data import PackedData
from crma_jax.train.bench.util import cpu_model
from crma_jax.train.cli import main
from crma_jax.train.continual import mix_replay
from crma_jax.train.inference import load_for_inference
from crma_jax.train.metrics import read_metrics

WORDS = {
    "greek": "alpha beta gamma delta epsilon zeta",
    "counts": "one two three four five six seven",
    "colors": "red green blue cyan magenta yellow",
}


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    rng = random.Random(0)
    out = []
    for name, words in WORDS.items():
        path = root / f"{name}.jsonl"
        ws = words.split()
        path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(ws) for _ in range(30))}) for _ in range(40)))
        out.append(f"{name}={path}")
    return out


def _args(tiny_lm, domains, out, seeds="0", extra=()):
    args = ["cl", "--model", str(tiny_lm), "--out", str(out), "--steps", "8", "--warmup-steps", "1",
            "--seq-len", "32", "--batch-size", "4", "--checkpoint-every", "4", "--eval-every", "0",
            "--lr-lora", "5e-3", "--lr-crma-read-mix", "5e-2", "--seeds", seeds,
            "--report-to", "none", "--mesh", "1,1,1", *extra]
    for d in domains:
        args += ["--domain", d]
    return args


METHODS = ("naive", "frozen", "modular", "replay", "ewc", "olora", "inflora", "frozen_substrate", "isolated")
# One seed keeps the nine-method sequence affordable; pooling over seeds is `crma cl-table`'s, and
# tests/test_cl_table.py checks it.
SEEDS = ("0",)


@pytest.fixture(scope="module")
def finished(tiny_lm, domains, tmp_path_factory):
    out = tmp_path_factory.mktemp("cl") / "run"
    extra = ("--conditions", ",".join(METHODS), "--routing-tokens", "8", "--replay-fraction", "0.25",
             "--checkpoint-every", "8")  # one checkpoint per domain; the kill tests below use step 4's
    assert main(_args(tiny_lm, domains, out, seeds=",".join(SEEDS), extra=extra)) == 0
    return out, json.loads((out / "results.json").read_text())


def test_matrix_metrics_and_files(finished):
    out, payload = finished
    assert payload["domains"] == list(WORDS) and payload["seeds"] == [int(s) for s in SEEDS]
    for cond in METHODS:
        for seed in SEEDS:
            r = payload["results"][cond][seed]
            L = np.asarray(r["L"], float)
            assert L.shape == (3, 3) and (L > 0).all() and len(r["base"]) == 3
            b = np.asarray(r["base"], float)
            # GEM's definitions written out here, not by the function that stored them.
            np.testing.assert_allclose(r["drift"], [(L[2, 0] - L[0, 0]) / L[0, 0], (L[2, 1] - L[1, 1]) / L[1, 1]],
                                       rtol=1e-12)
            assert r["acc"] == pytest.approx((L[2, 0] + L[2, 1] + L[2, 2]) / 3, rel=1e-12)
            assert r["bwt"] == pytest.approx(((L[0, 0] - L[2, 0]) + (L[1, 1] - L[2, 1])) / 2, rel=1e-12)
            assert r["fwt"] == pytest.approx(((b[1] - L[0, 1]) + (b[2] - L[1, 2])) / 2, rel=1e-12)
            assert r["wall_s"] > 0 and r["cpus"] == [cpu_model()]
        drifts = np.asarray([payload["results"][cond][s]["drift"] for s in SEEDS])
        np.testing.assert_allclose(payload["summary"][cond]["drift_mean"], drifts.mean(0))
        accs = [payload["results"][cond][s]["acc"] for s in SEEDS]
        assert payload["summary"][cond]["acc"]["mean"] == pytest.approx(np.mean(accs))
        assert payload["summary"][cond]["acc"]["min"] == pytest.approx(min(accs))
    for out_file in ("results.md", "heatmap.png", "drift.png", "transfer.png", "substrate.png"):
        assert (out / out_file).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert all(f"| {m.upper()} |" in table for m in METHODS) and "BWT" in table


def test_each_method_shows_its_defining_behaviour(finished):
    out, payload = finished
    for seed in SEEDS:
        frozen = payload["results"]["frozen"][seed]
        assert frozen["drift"] == [0.0, 0.0] and frozen["bwt"] == 0.0
        assert frozen["fwt"] == 0.0  # an untrained domain gets a fresh LoRA: exactly the starting model
        naive = payload["results"]["naive"][seed]
        assert any(abs(d) > 1e-3 for d in naive["drift"])  # one shared LoRA: earlier losses move
        modular = payload["results"]["modular"][seed]
        assert modular["L"][0][0] != modular["L"][2][0]  # the shared substrate kept training
        assert len(modular["substrate"]) == 3
        assert all(max(e["mix_displacement"]) > 0 and e["hidden_change"] > 0 for e in modular["substrate"])
        assert not naive["substrate"] and naive["substrate_init"] is None
        start = modular["substrate_init"]["mix_displacement"]
        assert len(start) == len(modular["substrate"][-1]["mix_displacement"])
        assert max(abs(a - b) for a, b in zip(start, modular["substrate"][-1]["mix_displacement"])) > 0
    # EWC: no penalty on the first domain, a positive one on the next (the Fisher of the first).
    first = read_metrics(out / "ewc" / "seed0" / "greek")
    second = read_metrics(out / "ewc" / "seed0" / "counts")
    assert all(r["penalty"] == 0.0 for r in first) and all(r["penalty"] > 0.0 for r in second)
    # One ZClip over the sequence: each domain's clipper goes on from the last one's statistics, so
    # its count of folded-in norms is 3 × 8 after three domains of 8 steps (8 without the carry).
    progress = json.loads((out / "ewc" / "seed0" / "progress.json").read_text())
    assert progress["zclip"][0] == 3 * 8  # ZClipState.count
    # O-LoRA: the penalty is 0 until an earlier LoRA exists, then positive (random new A's overlap).
    olora = read_metrics(out / "olora" / "seed0" / "counts")
    assert all(r["penalty"] > 0.0 for r in olora)
    assert (out / "olora" / "seed0" / "memory.safetensors").stat().st_size > 0
    # InfLoRA: every domain's A was fixed (orthonormal columns, from its inputs) and never trained.
    from crma_jax.adapter_files import load_adapters

    for name, lora in load_adapters(out / "inflora" / "seed0").lora_sets.items():
        if name == "inflora":
            continue
        for pair in jax.tree.leaves(lora, is_leaf=lambda n: isinstance(n, dict) and "a" in n):
            a = np.asarray(pair["a"], np.float64)
            np.testing.assert_allclose(np.einsum("lir,lis->lrs", a, a), np.broadcast_to(np.eye(a.shape[-1]), (a.shape[0],) * 1 + (a.shape[-1],) * 2), atol=1e-4)
    assert all(r["penalty"] == 0.0 for r in read_metrics(out / "inflora" / "seed0" / "counts"))


def test_frozen_substrate_and_isolated_share_nothing_after_the_first_domain(finished):
    """FROZEN_SUBSTRATE's substrate moves in the first domain only; ISOLATED trains a substrate
    per domain. Neither can change an earlier domain's model, so both drift exactly 0, and both
    start the first domain exactly as MODULAR does."""
    from safetensors.numpy import load_file

    out, payload = finished
    for seed in SEEDS:
        modular = payload["results"]["modular"][seed]
        for cond in ("frozen_substrate", "isolated"):
            r = payload["results"][cond][seed]
            assert r["drift"] == [0.0, 0.0] and r["bwt"] == 0.0, cond
            assert r["L"][0][0] == pytest.approx(modular["L"][0][0], rel=1e-6), cond
        fs = payload["results"]["frozen_substrate"][seed]["substrate"]
        assert fs[0]["mix_displacement"] == fs[1]["mix_displacement"] == fs[2]["mix_displacement"]
        assert fs[0]["mix_displacement"] != payload["results"]["frozen_substrate"][seed]["substrate_init"]["mix_displacement"]
    kept = {cond: load_file(str(out / cond / "seed0" / "substrates.safetensors")) for cond in ("frozen_substrate", "isolated")}
    for key, first in kept["frozen_substrate"].items():
        if key.startswith("0/"):
            for t in ("1/", "2/"):
                np.testing.assert_array_equal(kept["frozen_substrate"][t + key[2:]], first)
    assert any(not np.array_equal(kept["isolated"]["0/" + k[2:]], v) for k, v in kept["isolated"].items()
               if k.startswith("2/"))


def test_task_agnostic_evaluation(finished):
    _, payload = finished
    for cond in METHODS:
        agnostic = payload["results"][cond]["0"]["agnostic"]
        assert agnostic["prefix_tokens"] == 8 and len(agnostic["loss"]) == 3
        assert all(t > 0 for t in agnostic["scored_tokens"])
        routed = cond in ("frozen", "modular", "frozen_substrate", "isolated")
        assert agnostic["routed"] == routed
        if not routed:  # one model: without the task id it is the same model
            assert agnostic["loss"] == agnostic["oracle_loss"] and agnostic["accuracy"] == {}
            continue
        assert set(agnostic["accuracy"]) == set(WORDS)
        for i, name in enumerate(WORDS):
            assert 0.0 <= agnostic["accuracy"][name] <= 1.0
            # Routed and oracle losses are scored on the same tokens after the routing prefix;
            # where routing picks the true set every time, the two agree exactly.
            if agnostic["accuracy"][name] == 1.0:
                assert agnostic["loss"][i] == agnostic["oracle_loss"][i]


def test_replay_mixes_the_asked_share_of_earlier_rows():
    def rows(n, value):
        return PackedData(*(np.full((n, 4), value, np.int32) for _ in range(4)))

    mixed = mix_replay(rows(30, 1), [rows(5, 2), rows(5, 3)], 0.25, seed=0)
    assert mixed.num_rows == 40 and (mixed.input_ids[:30] == 1).all()
    assert set(np.unique(mixed.input_ids[30:])) <= {2, 3}
    assert mix_replay(rows(30, 1), [], 0.25, seed=0).num_rows == 30


@pytest.mark.parametrize("method", ["modular", "ewc"])
def test_interrupted_run_resumes_at_the_domain_and_reaches_the_same_numbers(method, tiny_lm, domains, tmp_path,
                                                                            finished):
    out = tmp_path / "killed"
    args = _args(tiny_lm, domains, out, extra=("--conditions", method, "--no-plots", "--routing-tokens", "8",
                                               "--replay-fraction", "0.25"))
    driver = Path(__file__).with_name("fault_injection.py")
    proc = subprocess.run([sys.executable, str(driver), "after_checkpoint", "4", "counts", "--", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    progress = json.loads((out / method / "seed0" / "progress.json").read_text())
    assert progress["finished"] == ["greek"] and progress["cpus"] == [cpu_model()]  # killed inside the second domain
    # The resume runs on another machine: the sequence's wall time was spent on both CPUs.
    (out / method / "seed0" / "progress.json").write_text(json.dumps({**progress, "cpus": ["Another CPU"]}))
    assert main(args + ["--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())["results"][method]["0"]
    reference = finished[1]["results"][method]["0"]
    np.testing.assert_allclose(np.asarray(resumed["L"], float), np.asarray(reference["L"], float), rtol=1e-6)
    assert 0 < progress["wall_s"] < resumed["wall_s"]  # the killed process's finished domain still counts
    assert resumed["cpus"] == sorted(["Another CPU", cpu_model()])


def test_a_second_run_into_the_same_out_is_refused_not_mixed(tiny_lm, domains, finished, capsys):
    out, payload = finished
    before = (out / "results.json").read_text()
    args = _args(tiny_lm, domains, out, seeds=",".join(SEEDS), extra=("--conditions", ",".join(METHODS),
                                                                      "--routing-tokens", "8", "--replay-fraction", "0.25"))
    capsys.readouterr()
    assert main([*args, "--lr-lora", "1e-2"]) == 2
    assert f"{out}: already holds a run; pass --resume" in capsys.readouterr().err
    assert main([*args, "--lr-lora", "1e-2", "--resume"]) == 2
    assert "lr_lora: 0.005 -> 0.01" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_pissa_gives_every_domain_the_same_initial_factors_on_the_residual_base(tiny_lm, domains, tmp_path):
    """With PiSSA, each fresh LoRA is (A0, B0) on W − s·A0·B0: with LR 0 every domain's set
    stays (A0, B0) and every holdout loss is the base model's."""
    import crma_jax
    from crma_jax.adapter_files import load_adapters
    from crma_jax.data import DataSpec
    from crma_jax.evaluate import evaluate
    from crma_jax.pretrained import load_tokenizer

    out = tmp_path / "pissa"
    args = _args(tiny_lm, domains[:2], out, extra=("--conditions", "naive,frozen", "--lora-init", "pissa",
                                                   "--lr-lora", "0", "--steps", "2", "--no-plots"))
    assert main(args) == 0
    payload = json.loads((out / "results.json").read_text())
    model, params = crma_jax.load_pretrained(tiny_lm)
    tokenizer = load_tokenizer(tiny_lm)
    for j, name in enumerate(list(WORDS)[:2]):
        spec = DataSpec(**load_adapters(out / "frozen" / "seed0").data[name])
        base = evaluate(model, {"params": params}, spec.build(tokenizer)[1], 4).loss
        for cond in ("naive", "frozen"):
            assert payload["results"][cond]["0"]["L"][1][j] == pytest.approx(base, rel=1e-5)
    saved = load_adapters(out / "frozen" / "seed0")
    for name, lora in saved.lora_sets.items():
        for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(saved.lora_init)):
            np.testing.assert_array_equal(a, b)


def test_bad_arguments(tiny_lm, capsys):
    assert main(["cl", "--model", str(tiny_lm), "--domain", "only"]) == 2
    assert ">= 2 domains" in capsys.readouterr().err
    assert main(["cl", "--model", str(tiny_lm), "--conditions", "naive,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["cl", "--model", str(tiny_lm), "--conditions", "olora", "--lora-init", "pissa"]) == 2
    assert "--lora-init default" in capsys.readouterr().err
    assert main(["cl", "--model", str(tiny_lm), "--conditions", "replay", "--replay-fraction", "1.5"]) == 2
    assert "--replay-fraction" in capsys.readouterr().err
    assert main(["cl", "--model", str(tiny_lm), "--conditions", "olora", "--domain", "olora=a.txt", "--domain", "b"]) == 2
    assert "domain named 'olora'" in capsys.readouterr().err
    assert main(["cl", "--model", str(tiny_lm), "--conditions", "inflora", "--weight-decay", "0.01"]) == 2
    assert "--weight-decay 0" in capsys.readouterr().err
    assert main(["cl", "--model", str(tiny_lm), "--conditions", "frozen_substrate", "--weight-decay", "0.01"]) == 2
    assert "keeps the substrate fixed after the first domain" in capsys.readouterr().err
    assert main(["cl", "--model", str(tiny_lm), "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # `--data` means nothing to `crma cl`: refused, not ignored
        main(["cl", "--model", str(tiny_lm), "--data", "legal"])
    assert "unrecognized arguments: --data" in capsys.readouterr().err


def test_qa_on_fictional_facts_reports_crma_on_and_off(tiny_lm, tmp_path):
    out = tmp_path / "qa"
    args = ["cl", "--model", str(tiny_lm), "--out", str(out), "--steps", "4", "--warmup-steps", "1",
            "--seq-len", "64", "--batch-size", "4", "--eval-every", "0", "--lr-lora", "5e-3", "--seeds", "0",
            "--report-to", "none", "--no-plots", "--mesh", "1,1,1", "--max-documents", "6",
            "--conditions", "naive,modular", "--domain", "facts-geography", "--domain", "facts-music"]
    assert main(args) == 0
    payload = json.loads((out / "results.json").read_text())
    for cond in ("naive", "modular"):
        qa = payload["results"][cond]["0"]["qa"]
        assert qa["questions"] == 10  # 6 facts per domain, one held out by the 10% split
        assert set(qa["per_domain"]) == {"facts-geography", "facts-music"}
        assert 0.0 <= qa["crma_on"] <= 1.0
        assert ("crma_off" in qa) == (cond == "modular")
    assert "QA on the fictional facts" in (out / "results.md").read_text()


def test_olora_sequence_exports_the_sum_of_its_domains_loras(tiny_lm, finished, tmp_path):
    """O-LoRA's one model is every domain's LoRA at once: the run saves it as the set `olora`
    (rank 3·8, same scale), the default of `crma generate`, and PEFT reproduces it."""
    out, _ = finished
    run = out / "olora" / "seed0"
    ids = np.random.RandomState(5).randint(3, 100, (2, 12))
    model, variables, _ = load_for_inference(str(run))
    ours = np.asarray(model.apply(variables, ids))
    single = np.asarray(model.apply(load_for_inference(str(run), "colors")[1], ids))
    assert np.abs(ours - single).max() > 1e-3  # the sum, not the last domain's LoRA alone
    export_run(run, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "peft_olora" / "adapter_config.json").read_text())
    assert config["r"] == 24 and config["lora_alpha"] == pytest.approx(16.0 * 3)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, tmp_path / "export" / "peft_olora").eval()
    with torch.no_grad():
        theirs = peft(torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-4


def test_fingerprints_record_every_domain_and_a_changed_document_is_refused_on_resume(tiny_lm, domains, tmp_path,
                                                                                      capsys):
    from crma_jax.dedupe import fingerprint

    copies = []
    for d in domains[:2]:
        name, _, path = d.partition("=")
        (tmp_path / f"{name}.jsonl").write_text(Path(path).read_text())
        copies.append(f"{name}={tmp_path / f'{name}.jsonl'}")
    out = tmp_path / "fp"
    args = _args(tiny_lm, copies, out, extra=("--conditions", "naive", "--steps", "2", "--no-plots"))
    assert main(args) == 0
    prints = json.loads((out / "results.json").read_text())["fingerprints"]
    assert list(prints) == ["greek", "counts"]
    texts = [json.loads(line)["text"] for line in (tmp_path / "greek.jsonl").read_text().splitlines()]
    both = prints["greek"]["train"]["documents"] + prints["greek"]["holdout"]["documents"]
    assert both == len(set(texts)) == 40
    # Change one document: the fingerprint changes, and the run will not resume on it.
    lines = (tmp_path / "greek.jsonl").read_text().splitlines()
    lines[5] = json.dumps({"text": texts[5] + " omega"})
    (tmp_path / "greek.jsonl").write_text("\n".join(lines))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "domain 'greek' is not the documents this run started on" in capsys.readouterr().err
    assert fingerprint(texts) != fingerprint([*texts[:5], texts[5] + " omega", *texts[6:]])
