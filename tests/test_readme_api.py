"""The README's "Python API" section, every python block in order, run on a tiny model: the
names a block uses without defining (a model path, a batch, a tokenizer) are set up here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def api_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)\n```", section, re.S)


def test_the_python_api_section_runs_as_written(tiny_lm, tmp_path):
    from crma_jax.data import BatchIterator, DataSpec
    from crma_jax.pretrained import load_tokenizer

    blocks = api_blocks()
    assert len(blocks) >= 4
    data = tmp_path / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"note {i}: the quick brown fox"}) for i in range(40)))
    tokenizer = load_tokenizer(tiny_lm)
    batch = next(BatchIterator(DataSpec(str(data), seq_len=32).build(tokenizer)[0], batch_size=2))
    namespace = {
        "path": str(tiny_lm), "input_ids": jnp.asarray(batch["input_ids"]), "batch": batch, "tokenizer": tokenizer,
        "rng": jax.random.PRNGKey(0), "log_mix": jax.random.normal(jax.random.PRNGKey(1), (4, 4)),
        "w": np.asarray(jax.random.normal(jax.random.PRNGKey(2), (64, 128)), np.float32),
    }
    for block in blocks:
        code = block.replace('"path/to/hf_dir_or_model.gguf"', "path").replace('"my_chat.jsonl"', repr(str(data)))
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["logits"].shape[:2] == batch["input_ids"].shape
    assert np.isfinite(float(namespace["metrics"]["loss"]))
    assert namespace["batches"].state() == {"epoch": 0, "index": 0}
