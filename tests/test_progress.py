"""crma_jax.progress: a bar on a terminal, plain lines in a log."""

from __future__ import annotations

from crma_jax.progress import LineProgress, bar


def test_a_log_gets_lines_not_carriage_returns(capsys):
    shown = bar(range(5), total=5, desc="eval", unit="batch")  # pytest's stderr is no terminal
    assert isinstance(shown, LineProgress)
    assert list(shown) == list(range(5))
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == [err.splitlines()[-1]]  # one line: at the end, none per item
    assert err.startswith("eval: 5/5 batches (100%), ")


def test_lines_come_at_most_every_few_seconds_and_postfix_is_shown(capsys):
    steps = LineProgress(total=4, desc="train", unit="step", initial=1, every_s=0.0)
    steps.set_postfix(loss="2.5000")
    steps.update()
    steps.update(2)
    steps.close()  # nothing new since the last line: no repeat
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(", ")[0] for line in lines] == ["train: 2/4 steps (50%)", "train: 4/4 steps (100%)"]
    assert lines[-1].endswith("loss=2.5000")
    quiet = LineProgress(range(3), total=3, desc="eval", unit="batch", leave=False)  # a bar that vanishes
    assert list(quiet) == [0, 1, 2] and capsys.readouterr().err == ""
