"""`crma_jax.adapter_files`: RUN/adapters survives a kill during its replacement."""

from __future__ import annotations

import os

import numpy as np
import pytest

from crma_jax.adapter_files import Adapters, BaseSpec, load_adapters, save_adapters


def _adapters(value: float) -> Adapters:
    return Adapters(BaseSpec("/models/base"), None, None, {"x": {"layers": {"a": np.full((2, 3), value, np.float32)}}},
                    None)


def test_a_kill_while_replacing_the_adapters_never_loses_them(tmp_path, monkeypatch):
    save_adapters(tmp_path, _adapters(1.0))
    hits = []

    def killed_once(real):
        def move(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == "adapters" and not hits:
                hits.append(dst)
                raise KeyboardInterrupt  # the process dies as the new adapters are moved into place
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", killed_once(os.rename))
    monkeypatch.setattr(os, "replace", killed_once(os.replace))
    with pytest.raises(KeyboardInterrupt):
        save_adapters(tmp_path, _adapters(2.0))
    monkeypatch.undo()
    # The save had committed before the kill: the next reader finds the new adapters.
    np.testing.assert_array_equal(load_adapters(tmp_path).lora_sets["x"]["layers"]["a"], 2.0)


def test_a_kill_while_writing_keeps_the_old_adapters(tmp_path, monkeypatch):
    import crma_jax.adapter_files as files

    save_adapters(tmp_path, _adapters(1.0))

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_tensors", dies)
    with pytest.raises(KeyboardInterrupt):
        save_adapters(tmp_path, _adapters(2.0))
    monkeypatch.undo()
    np.testing.assert_array_equal(load_adapters(tmp_path).lora_sets["x"]["layers"]["a"], 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]  # no staging left behind


def test_a_relative_model_or_data_path_is_recorded_resolved(tmp_path, monkeypatch):
    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    adapters = _adapters(1.0)
    (tmp_path / "notes.jsonl").write_text('{"text": "a note"}\n')
    (tmp_path / "legal").mkdir()  # a directory named like a built-in domain: read as the directory
    data = {"main": {"source": "notes.jsonl", "eval_source": "legal", "seq_len": 32},
            "other": {"source": "docs", "seq_len": 32}}  # no such path here: the built-in domain
    relative = Adapters(BaseSpec("models/base"), None, None, adapters.lora_sets, None, data=data)
    save_adapters(tmp_path / "run", relative)
    monkeypatch.chdir(tmp_path / "run")  # crma eval / export from elsewhere
    loaded = load_adapters(tmp_path / "run")
    assert loaded.model == str(tmp_path / "models" / "base") and loaded.base.model == loaded.model
    assert loaded.data["main"] == {"source": str(tmp_path / "notes.jsonl"), "eval_source": str(tmp_path / "legal"),
                                   "seq_len": 32}
    assert loaded.data["other"] == data["other"]
    named = Adapters(BaseSpec("smollm2"), None, None, adapters.lora_sets, None)  # a name, not a path: kept
    save_adapters(tmp_path / "run2", named)
    assert load_adapters(tmp_path / "run2").model == "smollm2"
