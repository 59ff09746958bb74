"""`crma report RUN`: a self-contained HTML page; every embedded image decodes, and headless
Chromium renders the page with every image loaded.

The render check needs Debian's `chromium`, which `.ci/run` installs and makes compulsory
(CRMA_REQUIRE_CHROMIUM=1); elsewhere it runs when a chromium is on PATH.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conftest import word_jsonl
from crma_jax.train.cli import main

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class _Page(HTMLParser):
    """The page's images (src), table cells and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self.external: list[str] = []
        self.headings: list[str] = []
        self._in_cell = self._in_heading = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")
        if tag == "h2":
            self._in_heading = True
            self.headings.append("")
        for key in ("href", "src"):
            if attrs.get(key) and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False
        if tag == "h2":
            self._in_heading = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data
        if self._in_heading:
            self.headings[-1] += data


@pytest.fixture(scope="module")
def train_run(tiny_lm, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = word_jsonl(root / "docs.jsonl", "the court shall grant a license to any party under the terms")
    run = root / "run"
    assert main(["train", "--model", str(tiny_lm), "--data", str(data), "--out", str(run), "--steps", "4",
                 "--warmup-steps", "1", "--seq-len", "32", "--batch-size", "4", "--eval-every", "2",
                 "--report-to", "none", "--mesh", "1,1,1"]) == 0
    return run


def test_report_embeds_settings_summary_and_every_plot(train_run, capsys):
    assert main(["report", str(train_run)]) == 0
    out = train_run / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    page = _Page()
    page.feed(out.read_text())
    pngs = sorted(p.name for p in train_run.glob("*.png"))
    assert len(page.images) == len(pngs) == 3 and not page.external  # self-contained
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100
    assert "holdout_loss" in page.cells and "lr_lora" in page.cells  # summary.json and config.yaml
    assert page.headings == ["Summary", "Speed", "Data", "Samples", "Plots", "Settings", "Versions"]
    summary = json.loads((train_run / "summary.json").read_text())
    cell = dict(zip(page.cells[::2], page.cells[1::2]))  # key-value tables: th, then td
    assert float(cell["wall_s"]) == summary["wall_s"] > 0 and float(cell["mean_tokens_per_s"]) > 0
    assert int(cell["documents.holdout"]) == summary["data"]["documents"]["holdout"] > 0
    assert cell["jax"] == summary["versions"]["jax"] and cell["python"].count(".") == 2
    # The samples table: a header row, then per sample the prompt and both continuations.
    start = page.cells.index("holdout prompt")
    assert page.cells[start:start + 3] == ["holdout prompt", "continuation, CRMA on", "continuation, CRMA off"]
    rows = page.cells[start + 3:start + 3 + 3 * len(summary["samples"])]
    assert rows == [x[k] for x in summary["samples"] for k in ("prompt", "crma_on", "crma_off")]
    assert summary["samples"] and all(x["prompt"] and x["crma_on"] for x in summary["samples"])


def test_report_of_no_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished run here" in capsys.readouterr().err


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CRMA_REQUIRE_CHROMIUM"):
        pytest.fail("CRMA_REQUIRE_CHROMIUM is set but no chromium is on PATH (.ci/run installs Debian's chromium)")
    return found


def test_headless_chromium_renders_the_page_with_every_image(train_run, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH; .ci/run installs it and sets CRMA_REQUIRE_CHROMIUM=1")
    main(["report", str(train_run), "--out", str(tmp_path / "page.html")])
    url = (tmp_path / "page.html").as_uri()
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images="3/3"' in dom.stdout  # the page's own check: every image decoded
    shot = tmp_path / "page.png"
    render = subprocess.run([*common, "--window-size=1280,1600", f"--screenshot={shot}", url], capture_output=True,
                            text=True, timeout=120)
    assert render.returncode == 0 and shot.stat().st_size > 10_000, render.stderr[-2000:]
    image = Image.open(shot)
    assert image.size == (1280, 1600) and len(set(image.convert("L").getdata())) > 16  # not a blank page
