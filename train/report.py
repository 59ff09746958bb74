"""`crma report RUN`: one self-contained HTML page for a `crma train`, `crma cl` or `crma ablate` run.

The page holds the run's settings (config.yaml), its summary tables (for a train run,
summary.json's: the results, speed, the data it used, sample generations with CRMA on and off,
and package versions; results.md or ablation.md, the same tables the programs print, for the
others) and every PNG plot in the run directory, embedded as base64 data, so the file can be mailed or archived
on its own: it loads nothing from disk or network. A few lines of script count the images the
browser decoded into `<body data-images="decoded/total">`, which a headless browser can check.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path
from typing import Any

import yaml

from crma_jax.atomic import atomic_file
from crma_jax.train.run_dir import CONFIG_FILE

KINDS = {"results.json": "crma cl", "ablation.json": "crma ablate", "summary.json": "crma train"}
TABLES = {"crma cl": "results.md", "crma ablate": "ablation.md"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1d2330; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #d7dbe3; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .85rem; }
th, td { border: 1px solid #d7dbe3; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f1f3f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; vertical-align: top; margin: .5rem 1rem .5rem 0; } figure img { max-width: 34rem; border: 1px solid #e4e7ee; }
figcaption { font-size: .8rem; color: #5a6375; } .meta { color: #5a6375; font-size: .85rem; }
details { margin: .5rem 0; } summary { cursor: pointer; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .8rem; max-width: 24rem; }
.warning { color: #8a4b00; background: #fff4e0; padding: .4rem .6rem; border-left: 3px solid #e0a030; }
"""

# Counts the images the browser decoded (a render check: a broken data URI has naturalWidth 0).
CHECK_IMAGES = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
});
"""


def run_kind(run: Path) -> str:
    """'crma train', 'crma cl' or 'crma ablate', from the files a finished run of each leaves."""
    for name, kind in KINDS.items():
        if (run / name).is_file():
            return kind
    raise FileNotFoundError(f"{run}: no finished run here (none of {', '.join(KINDS)}); is it a crma run "
                            f"directory, and did the run finish?")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.6g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    return f"<td>{html.escape(str(value))}</td>"


def key_value_table(items: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th>{_cell(v)}</tr>" for k, v in items.items())
    return f"<table>{rows}</table>"


def markdown_html(text: str) -> str:
    """The programs' markdown (paragraphs and pipe tables) as HTML."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested summary as one key-value table."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def samples_table(samples: list[dict[str, str]]) -> str:
    """Prompt and continuations side by side, one row per sample."""
    columns = [c for c in ("prompt", "crma_on", "crma_off") if any(c in x for x in samples)]
    names = {"prompt": "holdout prompt", "crma_on": "continuation, CRMA on", "crma_off": "continuation, CRMA off"}
    head = "".join(f"<th>{names[c]}</th>" for c in columns)
    rows = "".join("<tr>" + "".join(f'<td class="text">{html.escape(x.get(c, ""))}</td>' for c in columns) + "</tr>"
                   for x in samples)
    return f'<table class="samples"><tr>{head}</tr>{rows}</table>'


SPEED = ("wall_s", "train_step_s", "mean_tokens_per_s")


def train_sections(summary: dict[str, Any]) -> list[str]:
    """The sections of a train run's page before its plots: results, speed, data, samples."""
    nested = ("data", "samples", "versions")
    parts = ["<h2>Summary</h2>",
             key_value_table({k: v for k, v in summary.items() if k not in nested and k not in SPEED})]
    if any(k in summary for k in SPEED):  # a run summarised before speed was recorded has none
        parts += ["<h2>Speed</h2>", key_value_table({k: summary[k] for k in SPEED if k in summary})]
    if "data" in summary:
        data = {k: v for k, v in summary["data"].items() if k != "warnings"}
        parts += ["<h2>Data</h2>", key_value_table(_flat(data))]
        parts += [f'<p class="warning">{html.escape(w)}</p>' for w in summary["data"].get("warnings", [])]
    if summary.get("samples"):
        parts += ["<h2>Samples</h2>", '<p class="meta">Greedy continuations of holdout openings at the end of '
                  "training.</p>", samples_table(summary["samples"])]
    return parts


def figure(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    name = html.escape(png.name)
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


def render_report(run: Path) -> str:
    """The HTML page of the finished run in `run` (module docstring)."""
    run = Path(run)
    kind = run_kind(run)
    config = yaml.safe_load((run / CONFIG_FILE).read_text()) if (run / CONFIG_FILE).is_file() else {}
    parts = [f"<h1>{html.escape(run.name)}</h1>",
             f'<p class="meta">{kind} run in {html.escape(str(run.resolve()))}</p>']
    summary = json.loads((run / "summary.json").read_text()) if kind == "crma train" else {}
    if kind == "crma train":
        parts += train_sections(summary)
    else:
        parts += ["<h2>Results</h2>", markdown_html((run / TABLES[kind]).read_text())]
    plots = sorted(run.glob("*.png"))
    if plots:
        parts += ["<h2>Plots</h2>", "".join(figure(p) for p in plots)]
    parts += ["<h2>Settings</h2>", f"<details open><summary>{CONFIG_FILE}</summary>{key_value_table(config)}</details>"]
    if "versions" in summary:
        parts += ["<h2>Versions</h2>", key_value_table(summary["versions"])]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(run.name)}: crma-jax report</title><style>{STYLE}</style>"
            f"<script>{CHECK_IMAGES}</script></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(run: Path, out: Path | None = None) -> Path:
    """Write the report (default RUN/report.html) atomically; returns its path."""
    out = Path(out) if out is not None else Path(run) / "report.html"
    page = render_report(Path(run))
    with atomic_file(out) as f:
        f.write(page.encode("utf-8"))
    return out


def add_report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a finished crma train, crma cl or crma ablate run directory")
    p.add_argument("--out", type=Path, help="the HTML file to write (default: RUN/report.html)")
