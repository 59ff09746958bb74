"""`crma cl-table`: the comparison table is computed from the runs' files, never typed in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from crma_jax.train.cl_table import cl_plots, cl_table, varying_settings
from crma_jax.train.cli import main


def _run(root, name, lr, L_by_seed, substrate=True, cpus=("CPU A",)):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"out": str(run), "lr_crma_mix": lr, "steps": 30}))
    results = {}
    for seed, L in L_by_seed.items():
        r = {"wall_s": 60.0 * (1 + int(seed)), "cpus": list(cpus), "L": L, "base": [3.0, 2.0], "acc": sum(L[-1]) / 2, "bwt": L[0][0] - L[1][0], "fwt": 2.0 - L[0][1],
             "drift": [(L[1][0] - L[0][0]) / L[0][0]], "substrate": [], "substrate_init": None,
             "agnostic": {"acc": sum(L[-1]) / 2 + 0.1, "accuracy": {"a": 1.0, "b": 0.5}}}
        if substrate:
            r["substrate_init"] = {"mix_displacement": [0.001, 0.003], "hidden_change": 0.01}
            r["substrate"] = [{"mix_displacement": [0.1, 0.3], "hidden_change": 0.5},
                              {"mix_displacement": [0.2, 0.4], "hidden_change": 0.25}]
        results[seed] = r
    (run / "results.json").write_text(json.dumps({"domains": ["a", "b"], "results": {"modular": results}}))
    return run


def test_rows_are_seed_means_with_the_settings_that_differ(tmp_path):
    one = _run(tmp_path, "one", 1e-3, {"0": [[2.0, 1.5], [2.2, 1.0]], "1": [[2.2, 1.5], [2.4, 1.2]]})
    two = _run(tmp_path, "two", 1e-2, {"0": [[2.0, 1.9], [2.0, 1.0]]}, substrate=False)
    assert varying_settings([{"out": "x", "a": 1, "b": 2, "seeds": "0"}, {"out": "y", "a": 1, "b": 3, "seeds": "1"}]) == ["b"]
    table = cl_table([one, two])
    transfer, losses = table.split("\n\nDomains ")
    rows = [line for line in transfer.splitlines() if line.startswith("| ")]
    # Saved as lr_crma_mix (its name before the rename), shown under its name now.
    assert rows[0].startswith("| lr_crma_read_mix | condition |")  # steps is the same in both runs: not shown
    cells = rows[1].split(" | ")
    # Drift of the seeds: (2.2 − 2.0)/2.0 = 10% and (2.4 − 2.2)/2.2 = 9.09%; their mean, std and range.
    assert cells[3] == "+9.55 ± 0.64 [+9.09, +10.00]"  # sample std (ddof 1)
    assert cells[4] == "1.7000 ± 0.1414 [1.6000, 1.8000]"
    assert cells[7] == "1.8000 ± 0.1414 [1.7000, 1.9000]"  # task-agnostic mean loss
    assert cells[8] == "75.0 ± 0.0 [75.0, 75.0]%"  # routing accuracy, mean over domains
    assert cells[9].rstrip(" |") == "1.5"  # minutes: seed 0 took 1, seed 1 took 2
    assert "mean over seeds, on CPU A." in transfer
    rows = [line for line in losses.splitlines() if line.startswith("| ")]
    first = rows[1].split(" | ")
    assert first[0] == "| 0.001" and first[1] == "MODULAR" and first[2] == "0,1"
    assert first[4] == "2.1000 / 1.1000"  # L[j][j]: seed means of 2.0, 2.2 and of 1.0, 1.2
    assert first[5] == "2.3000 / 1.1000"
    assert first[6] == "1.7000"  # mean loss: mean of (2.2 + 1.0)/2 and (2.4 + 1.2)/2
    assert first[7] == "-0.2000"
    assert first[9] == "0.002 → 0.2 → 0.3" and first[10].rstrip(" |") == "0.01 → 0.5 → 0.25"
    second = rows[2].split(" | ")
    assert second[9] == "–"  # no substrate


def test_unfinished_run_is_named(tmp_path, capsys):
    one = _run(tmp_path, "one", 1e-3, {"0": [[2.0, 1.5], [2.2, 1.0]]})
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="half"):
        cl_table([one, tmp_path / "half"])
    assert main(["cl-table", str(one), str(tmp_path / "half")]) == 2
    assert "not a finished `crma cl` run" in capsys.readouterr().err
    assert main(["cl-table", str(one), "--settings", "steps"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| steps | condition |")
    assert main(["cl-table", str(one), "--settings", "lr_crma_mix"]) == 0  # a setting's name before its rename
    assert capsys.readouterr().out.splitlines()[4].startswith("| 0.001 | MODULAR |")


def test_runs_with_the_same_settings_pool_their_seeds(tmp_path):
    seed0 = {"0": [[2.0, 1.5], [2.2, 1.0]]}
    first = _run(tmp_path, "first", 1e-3, {**seed0, "2": [[2.4, 1.5], [2.6, 1.4]]})
    # Seed 0 reproduced on another machine: the same numbers, other minutes on another CPU.
    again = _run(tmp_path, "again", 1e-3, {**seed0, "1": [[2.2, 1.5], [2.4, 1.2]]}, cpus=("CPU B",))
    other = _run(tmp_path, "other", 1e-2, {"1": [[2.0, 1.9], [2.0, 1.0]]})
    config = yaml.safe_load((first / "config.yaml").read_text())
    # A setting added after `first` was saved reads as its default, so the runs still pool.
    (again / "config.yaml").write_text(yaml.safe_dump({**config, "out": str(again), "inflora_threshold": 0.97}))
    rows = [line.split(" | ") for line in cl_table([first, again, other]).split("\n\nDomains ")[0].splitlines()
            if line.startswith("| 0.0")]
    assert [(r[1], r[2]) for r in rows] == [("MODULAR", "0,1,2"), ("MODULAR", "1")]
    assert rows[0][4] == "1.8000 ± 0.2000 [1.6000, 2.0000]"  # mean loss over the three distinct seeds
    assert rows[0][9].rstrip(" |") == "2.0"  # minutes: seeds 0, 1, 2 took 1, 2, 3
    assert "on 2 CPUs (CPU A; CPU B): compare rows of one CPU only." in cl_table([first, again])

    (again / "config.yaml").write_text(yaml.safe_dump({**config, "out": str(again), "steps": 60}))
    rows = [line.split(" | ")[:3] for line in cl_table([first, again]).splitlines() if "| MODULAR |" in line]
    assert rows[:2] == [["| 30", "MODULAR", "0,2"], ["| 60", "MODULAR", "0,1"]]  # the setting differs: apart
    clash = _run(tmp_path, "clash", 1e-3, {"0": [[2.0, 1.5], [2.3, 1.0]]})
    with pytest.raises(ValueError, match=r"seed 0 of modular is in both .*first and .*clash with different results"):
        cl_table([first, clash])
    # A key that only another method reads (InfLoRA's threshold) neither splits MODULAR's row nor
    # shows a value in it.
    (again / "config.yaml").write_text(yaml.safe_dump({**config, "out": str(again), "inflora_threshold": 0.5}))
    rows = [line.split(" | ")[:3] for line in cl_table([first, again]).splitlines() if "| MODULAR |" in line]
    assert rows[:1] == [["| –", "MODULAR", "0,1,2"]]
    inflora = json.loads((again / "results.json").read_text())
    inflora["results"] = {"inflora": inflora["results"]["modular"]}
    (again / "results.json").write_text(json.dumps(inflora))
    (first / "results.json").write_text((first / "results.json").read_text().replace('"modular"', '"inflora"'))
    rows = [line.split(" | ")[:3] for line in cl_table([first, again]).splitlines() if "| INFLORA |" in line]
    assert rows[:2] == [["| 0.97", "INFLORA", "0,2"], ["| 0.5", "INFLORA", "0,1"]]  # it reads it: apart



def test_plots_of_pooled_rows(tmp_path, capsys):
    first = _run(tmp_path, "first", 1e-3, {"0": [[2.0, 1.5], [2.2, 1.0]]})
    again = _run(tmp_path, "again", 1e-3, {"1": [[2.2, 1.5], [2.4, 1.2]]})
    other = _run(tmp_path, "other", 1e-2, {"0": [[2.0, 1.9], [2.0, 1.0]]})
    out = tmp_path / "plots"
    assert main(["cl-table", str(first), str(again), str(other), "--plots", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 0.001 | MODULAR | 0,1 |" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["drift.png", "heatmap.png", "substrate.png", "transfer.png"]
    assert all(f"plot: {out / n}" in printed for n in names)
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    # Earlier plots are not overwritten, and nothing is printed as if it had worked.
    before = {n: (out / n).stat().st_mtime_ns for n in names}
    assert main(["cl-table", str(first), "--plots", str(out)]) == 2
    captured = capsys.readouterr()
    assert "not an empty directory" in captured.err and captured.out == ""
    assert {n: (out / n).stat().st_mtime_ns for n in names} == before
    # Under --settings that cannot tell the two MODULAR rows apart, the plots refuse.
    with pytest.raises(ValueError, match="does not tell apart"):
        cl_plots([first, other], tmp_path / "fresh", ["steps"])
    assert not (tmp_path / "fresh").exists()


def test_versus_is_paired_per_seed_under_the_same_settings(tmp_path):
    frozen = tmp_path / "frozen"
    _run(tmp_path, "frozen", 1e-3, {"0": [[2.0, 1.5], [2.0, 1.0]], "1": [[2.0, 1.5], [2.0, 2.0]]})
    payload = json.loads((frozen / "results.json").read_text())
    payload["results"] = {"frozen": payload["results"]["modular"]}
    (frozen / "results.json").write_text(json.dumps(payload))
    modular = _run(tmp_path, "modular", 1e-3, {"0": [[2.0, 1.5], [2.2, 1.0]], "1": [[2.0, 1.5], [2.2, 2.0]],
                                               "2": [[2.0, 1.5], [2.0, 1.0]]})
    other = _run(tmp_path, "other", 1e-2, {"0": [[2.0, 1.5], [2.2, 1.0]]})
    lines = cl_table([frozen, modular, other], against=["frozen"]).split("\n\nDomains ")[0].splitlines()
    assert "Mean loss vs REFERENCE" in lines[0]
    assert lines[2].endswith("| mean loss vs FROZEN % | task-agnostic mean loss vs FROZEN % |")
    cells = {tuple(c.strip() for c in line.split("|")[1:3]): line.split(" | ") for line in lines[4:]}
    # FROZEN's mean loss is 1.5 (seed 0) and 2.0 (seed 1); MODULAR's 1.6 and 2.1: +6.67% and +5.00%, seed 2 unpaired.
    from scipy import stats as scipy_stats

    half = scipy_stats.t.ppf(0.975, 1) * np.std([5.0, 20 / 3], ddof=1) / np.sqrt(2)  # t over 1 dof
    ci = f"95% CI [{35 / 6 - half:+.2f}, {35 / 6 + half:+.2f}]"
    assert cells[("0.001", "MODULAR")][-2] == f"+5.83 ± 1.18 [+5.00, +6.67] (2 seeds; {ci})"
    assert cells[("0.001", "FROZEN")][-2] == "+0.00 ± 0.00 [+0.00, +0.00] (2 seeds; 95% CI [+0.00, +0.00])"
    assert cells[("0.01", "MODULAR")][-1].rstrip(" |") == "–"  # no FROZEN under these settings
    with pytest.raises(ValueError, match="--versus naive: no such condition .*frozen, modular"):
        cl_table([frozen, modular], against=["frozen", "naive"])


def test_runs_over_different_documents_are_not_pooled(tmp_path):
    first = _run(tmp_path, "first", 1e-3, {"0": [[2.0, 1.5], [2.2, 1.0]]})
    second = _run(tmp_path, "second", 1e-3, {"1": [[2.2, 1.5], [2.4, 1.2]]})
    prints = {"a": {"train": {"documents": 9, "sha256": "x"}, "holdout": {"documents": 1, "sha256": "y"}},
              "b": {"train": {"documents": 9, "sha256": "z"}, "holdout": {"documents": 1, "sha256": "w"}}}
    for run, fp in ((first, prints), (second, prints)):
        payload = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**payload, "fingerprints": fp}))
    assert "MODULAR | 0,1 |" in cl_table([first, second])  # the same documents: pooled
    changed = {**prints, "b": {**prints["b"], "holdout": {"documents": 1, "sha256": "other"}}}
    payload = json.loads((second / "results.json").read_text())
    (second / "results.json").write_text(json.dumps({**payload, "fingerprints": changed}))
    with pytest.raises(ValueError, match=r"first and .*second trained on different documents .*fingerprints differ: b\)"):
        cl_table([first, second])


def test_versus_the_new_baselines(tmp_path, capsys):
    base = _run(tmp_path, "base", 1e-3, {"0": [[2.0, 1.5], [2.0, 1.0]]})
    payload = json.loads((base / "results.json").read_text())
    same = payload["results"]["modular"]
    payload["results"] = {"frozen_substrate": same, "isolated": same}
    (base / "results.json").write_text(json.dumps(payload))
    modular = _run(tmp_path, "modular", 1e-3, {"0": [[2.0, 1.5], [2.2, 1.0]]})
    assert main(["cl-table", str(base), str(modular), "--versus", "frozen_substrate,isolated"]) == 0
    lines = capsys.readouterr().out.split("\n\nDomains ")[0].splitlines()
    assert lines[2].endswith("| mean loss vs FROZEN_SUBSTRATE % | task-agnostic mean loss vs FROZEN_SUBSTRATE % "
                             "| mean loss vs ISOLATED % | task-agnostic mean loss vs ISOLATED % |")
    cells = next(line for line in lines if "| MODULAR |" in line).split(" | ")
    assert "+6.67" in cells[-4] and "+6.67" in cells[-2]  # mean loss 1.6 against 1.5 of each, one seed
    assert "+0.00" in next(line for line in lines if "| ISOLATED |" in line).split(" | ")[-2]


def test_one_seed_shows_its_value_without_a_spread_and_the_legend_states_the_sample_std(tmp_path):
    from crma_jax.train.stats import spread, summary

    assert summary([1.0, 2.0, 3.0])["std"] == pytest.approx(1.0)  # ddof 1 (population: 0.816)
    assert summary([2.0]) == {"n": 1, "mean": 2.0, "std": None, "min": 2.0, "max": 2.0}
    assert spread([2.0], signed=False) == "2.0000"
    assert spread([2.0, 3.0], signed=False) == "2.5000 ± 0.7071 [2.0000, 3.0000]"
    one = _run(tmp_path, "one", 1e-3, {"0": [[2.0, 1.5], [2.2, 1.0]]})
    table = cl_table([one])
    assert "sample std (ddof 1) [min, max] over the n seeds of the seeds column (one seed: its value)" in table
    rows = table.split("\n\nDomains ")[0].split("\n", 1)[1]  # the first table, after its legend
    assert "| 1.6000 |" in rows and "±" not in rows
