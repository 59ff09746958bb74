"""Step metrics: metrics.jsonl, the `--report-to` trackers (TensorBoard, W&B offline), one writer."""

from __future__ import annotations

import json

import pytest

from conftest import word_jsonl
from crma_jax.train.cli import main
from crma_jax.train.metrics import MetricsWriter, read_metrics, scalars

RECORDS = [{"step": s, "loss": 3.0 - 0.25 * s, "grad_norm": 1.0 / s, "crma_alpha": [0.1 * s, 0.2]} for s in (1, 2, 3)]


def test_per_layer_lists_become_one_scalar_per_layer():
    assert scalars(RECORDS[0]) == {"loss": 2.75, "grad_norm": 1.0, "crma_alpha/layer_00": 0.1, "crma_alpha/layer_01": 0.2}


def test_a_writer_without_files_writes_nothing_and_still_summarises(tmp_path):
    writer = MetricsWriter(tmp_path, trackers=("tensorboard",), files=False)
    for r in RECORDS:
        writer.write({**r, "tokens_per_s": 10.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []  # no metrics.jsonl, no tb/
    assert writer.last("loss") == 2.25 and writer.summary()["peak_grad_norm"] == 1.0
    assert writer.summary()["train_step_s"] == 0.0  # records without token counts take no time
    timed = MetricsWriter(tmp_path, trackers=(), files=False)
    for r in RECORDS:
        timed.write({**r, "tokens": 20, "tokens_per_s": 10.0})
    assert timed.summary()["train_step_s"] == 2.0 * len(RECORDS)  # each step: 20 tokens at 10 per second


def _tensorboard_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TFRecord event files (u64 length, u32 crc, data, u32 crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_gets_every_scalar(tmp_path):
    writer = MetricsWriter(tmp_path, trackers=("tensorboard",))
    for r in RECORDS:
        writer.write(r)
    writer.close()
    assert read_metrics(tmp_path) == RECORDS
    events = _tensorboard_scalars(tmp_path / "tb")
    assert set(events) == set(scalars(RECORDS[0]))
    assert events["loss"] == [(r["step"], pytest.approx(r["loss"])) for r in RECORDS]


def test_wandb_offline_records_the_run_without_a_network(tiny_lm, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "")  # offline needs no account
    data = word_jsonl(tmp_path / "docs.jsonl", "a clause may bind each party to the terms of the contract")
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_lm), "--data", str(data), "--out", str(run), "--steps", "3",
                 "--warmup-steps", "1", "--seq-len", "32", "--batch-size", "4", "--eval-every", "0", "--no-plots",
                 "--report-to", "tensorboard,wandb", "--wandb-project", "crma-test", "--mesh", "1,1,1"]) == 0
    run_id = (run / "wandb_id").read_text()
    (log,) = (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    # The run log holds every logged scalar's name and the last step's loss (protobuf keeps strings raw).
    body = log.read_bytes()
    final = read_metrics(run)[-1]
    for key in ("loss", "grad_norm", "zclip/mu", "crma_alpha/layer_00", "lr/lora_a"):
        assert key.encode() in body, key
    assert json.dumps(final["loss"]).encode() in body
    assert "wandb sync" in capfd.readouterr().err  # W&B's own offline message: sync it later
    assert (run / "tb").is_dir() and len(read_metrics(run)) == 3


def test_report_to_is_checked():
    with pytest.raises(SystemExit):
        main(["train", "--report-to"])
    assert main(["train", "--report-to", "mlflow", "--steps", "20"]) == 2
    assert main(["train", "--report-to", "none,wandb", "--steps", "20"]) == 2
    assert main(["train", "--report-to", "wandb, none", "--steps", "20"]) == 2  # spaces change nothing


def test_a_cut_or_overwritten_line_is_skipped_and_named_and_appending_starts_a_fresh_line(tmp_path, capsys):
    from crma_jax.train.metrics import logged_steps, require_nothing_lost

    writer = MetricsWriter(tmp_path, trackers=())
    for r in RECORDS[:2]:
        writer.write(r)
    writer.close()
    path = tmp_path / "metrics.jsonl"
    # A crash in the middle of step 3's line, then a race that wrote NUL bytes after it.
    cut = b'{"step": 3, "loss": 1.' + b"\x00" * 40
    path.write_bytes(path.read_bytes() + cut)
    assert read_metrics(tmp_path) == RECORDS[:2]
    assert "metrics.jsonl: line 3 unreadable" in capsys.readouterr().err
    writer = MetricsWriter(tmp_path, trackers=(), append=True)  # a resume from step 2's checkpoint
    assert f"dropped {len(cut)} unreadable bytes" in capsys.readouterr().err
    writer.write(RECORDS[2])
    writer.close()
    assert read_metrics(tmp_path) == RECORDS
    assert capsys.readouterr().err == ""  # the log is whole again
    # A damaged line in the middle is skipped; the lines after it still count.
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"\x00\x00garbage\n" + b"".join(lines[1:]))
    assert logged_steps(tmp_path) == 3
    assert "line 2 unreadable" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="records 3 steps of an earlier attempt"):
        require_nothing_lost(tmp_path)
    require_nothing_lost(tmp_path / "absent")  # nothing logged, nothing lost
