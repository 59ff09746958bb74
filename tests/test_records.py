"""Records: every source kind (files, built-in domains, save_to_disk, a datasets name in the local
cache), field mapping, styles, and bad rows reported with their count and first line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from crma_jax.records import DataError, Fields, load_records

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf_cache")


def test_formats_load(tmp_path: Path, cache: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    js = load_records(write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}]), cache_dir=cache)
    assert (js.column("text"), js.style) == (["one", "two"], "text")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("line1\nline2\n")
    (tmp_path / "d" / "y.txt").write_text("other")
    txt = load_records(tmp_path / "d", cache_dir=cache)
    assert txt.column("text") == ["line1\nline2\n", "other"]  # one document per file
    single = load_records(tmp_path / "d" / "y.txt", fields=Fields(text="body"), cache_dir=cache)
    assert single.column("body") == ["other"]
    pq.write_table(pa.table({"instruction": ["i"], "input": [None], "output": ["o"]}), tmp_path / "a.parquet")
    par = load_records(tmp_path / "a.parquet", cache_dir=cache)
    assert par.style == "alpaca" and par.rows[0] == {"instruction": "i", "input": None, "output": "o"}
    assert load_records("docs", max_documents=3).column("text") and len(load_records("docs", max_documents=3)) == 3


def test_styles_follow_the_mapped_fields(tmp_path: Path, cache: str) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"conv": CHAT, "q": "a", "a": "b"}])
    assert load_records(path, fields=Fields(messages="conv"), cache_dir=cache).style == "chat"
    alpaca = load_records(path, fields=Fields(messages="none", instruction="q", output="a"), cache_dir=cache)
    assert alpaca.style == "alpaca" and alpaca.column("q") == ["a"]
    with pytest.raises(DataError, match=r"m.jsonl: records have the fields 'a', 'conv', 'q', none of the shapes "
                                         r"crma reads: 'text' \(plain text\).*Rename a field with --text-field"):
        load_records(path, cache_dir=cache)


def test_trl_and_sharegpt_records_are_read_and_question_answer_gets_its_flags(tmp_path: Path, cache: str) -> None:
    trl = load_records(write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "p", "completion": "c"}]), cache_dir=cache)
    assert trl.style == "completion" and trl.column("completion") == ["c"]
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    share = load_records(write_jsonl(tmp_path / "sg.jsonl", [{"conversations": turns, "id": "x"}]), cache_dir=cache)
    assert share.style == "chat" and share.column("messages") == [
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    bad = [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}]
    with pytest.raises(DataError, match=r"bad.jsonl: line 1: field 'conversations' \(ShareGPT speakers: system, human"
                                         r".*\): unknown role 'bot'"):
        load_records(write_jsonl(tmp_path / "bad.jsonl", bad), cache_dir=cache)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"qa.jsonl: records have the fields 'answer', 'question', none of the shapes"
                                         r".* --instruction-field question --output-field answer"):
        load_records(qa, cache_dir=cache)
    assert load_records(qa, fields=Fields(instruction="question", output="answer"), cache_dir=cache).style == "alpaca"


def test_empty_file(tmp_path: Path, cache: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("e.jsonl", "e.txt"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError, match=rf"{name}: empty file"):
            load_records(tmp_path / name, cache_dir=cache)
    (tmp_path / "b.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="b.jsonl: no records"):
        load_records(tmp_path / "b.jsonl", cache_dir=cache)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="e.parquet: no records"):
        load_records(tmp_path / "e.parquet", cache_dir=cache)


def test_bad_rows_are_counted_and_the_first_named_never_dropped_silently(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "a"}\n\n{"other": "b"}\n')
    with pytest.raises(DataError, match=r"m.jsonl: line 3: missing field 'text'"):
        load_records(path, cache_dir=cache)
    rows = [{"text": "ok"}, {"other": 1}, {"text": "ok"}, {"text": 5}, {"x": 2}]
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"m.jsonl: 3 of 5 rows \(text records\) cannot be used; the first, line 2: "
                                         r"missing field 'text'"):
        load_records(path, cache_dir=cache)
    kept = load_records(path, cache_dir=cache, skip_bad=True)
    assert kept.column("text") == ["ok", "ok"]
    assert "3 of 5 rows" in kept.skipped and "line 2" in kept.skipped and kept.skipped.endswith("skipped")
    write_jsonl(path, [{"instruction": "i", "output": "o"}, {"instruction": "j", "output": 3}])
    with pytest.raises(DataError, match=r"m.jsonl: line 2: field 'output' must be a string, got int"):
        load_records(path, cache_dir=cache, skip_bad=False)
    write_jsonl(path, [{"text": 1}])
    with pytest.raises(DataError, match="line 1"):  # nothing left to keep: an error even with skip_bad
        load_records(path, cache_dir=cache, skip_bad=True)


@pytest.mark.parametrize("messages, why", [
    ([], "an empty conversation"),
    ("hello", "must be a list of turns, got str"),
    ([{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role 'narrator'"),
    ([{"role": "user", "content": "x"}], "no assistant turn"),
    ([{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}], "starts with an assistant turn"),
    ([{"role": "user"}, {"role": "assistant", "content": "y"}], "a string 'role' and a string 'content'"),
])
def test_unusable_conversations_are_named_with_their_line(tmp_path: Path, cache: str, messages, why) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=rf"chat.jsonl: line 2: field 'messages': .*{why}"):
        load_records(path, cache_dir=cache)


def test_non_utf8_and_bad_json(tmp_path: Path, cache: str, capfd) -> None:
    for name, body in (("u.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), ("u.txt", b"fine\nbad \xff\n")):
        (tmp_path / name).write_bytes(body)
        with pytest.raises(DataError, match=rf"{name}:2: not valid UTF-8"):
            load_records(tmp_path / name, cache_dir=cache)
    (tmp_path / "j.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    capfd.readouterr()
    with pytest.raises(DataError, match=r"j.jsonl:3: invalid JSON \(Expecting ',' delimiter at column 13\)$"):
        load_records(tmp_path / "j.jsonl", cache_dir=cache)
    printed = capfd.readouterr()
    assert "pyarrow" not in printed.err + printed.out and "row" not in printed.err + printed.out  # no library noise
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(DataError, match=r"list.jsonl:2: a JSONL record must be an object, got list"):
        load_records(tmp_path / "list.jsonl", cache_dir=cache)
    # One field, two types: arrow's own words, after the file name.
    (tmp_path / "mixed.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"messages": "x"}))
    with pytest.raises(DataError, match=r"mixed.jsonl: could not be read as JSONL \(.*changed from array to string"):
        load_records(tmp_path / "mixed.jsonl", cache_dir=cache)
    with pytest.raises(DataError, match="nothing.jsonl: no such file"):
        load_records(tmp_path / "nothing.jsonl")


def test_a_huge_record_is_refused_by_line_before_it_costs_memory(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "huge.jsonl"
    with path.open("w") as f:  # a 50 MB line between two ordinary ones, as a broken export writes it
        f.write(json.dumps({"text": "fine"}) + "\n" + '{"text": "' + "x" * (50 << 20) + '"}\n' + '{"text": "ok"}\n')
    # In a fresh process with datasets imported, so the growth of its peak RSS (VmHWM) is this load's.
    code = ("import sys, datasets; from crma_jax.records import DataError, load_records\n"
            "def peak(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
            "before = peak()\n"
            "try: load_records(sys.argv[1], cache_dir=sys.argv[2])\n"
            "except DataError as e: print(e); print(peak() - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "cache")], capture_output=True,
                         text=True, timeout=120)
    message, grew_kib = out.stdout.strip().splitlines()
    assert message.endswith("huge.jsonl:2: a record longer than 8 MiB (crma_jax.records.MAX_RECORD_BYTES); split it "
                            "into documents of a sensible size"), out.stderr[-2000:]
    assert int(grew_kib) < 32 << 10  # under 32 MiB for a 50 MB line: read 8 MiB at a time, never parsed
    big = tmp_path / "book.txt"
    big.write_bytes(b"word " * (2 << 20))
    with pytest.raises(DataError, match=r"book.txt: a document longer than 8 MiB"):
        load_records(big)


def test_save_to_disk_directories(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"messages": CHAT}] * 3).save_to_disk(str(tmp_path / "one"))
    one = load_records(tmp_path / "one")
    assert one.style == "chat" and len(one) == 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]),
                          "test": datasets.Dataset.from_list([{"text": "c"}])}).save_to_disk(str(tmp_path / "dict"))
    assert load_records(tmp_path / "dict").column("text") == ["a", "b"]
    assert load_records(tmp_path / "dict", split="test").column("text") == ["c"]
    with pytest.raises(DataError, match=r"dict: no split 'validation'; the saved dataset has \['test', 'train'\]"):
        load_records(tmp_path / "dict", split="validation")


@pytest.fixture
def hf_cache(tmp_path: Path) -> Path:
    """A datasets cache holding `local/toy` (splits train, validation; config default), laid out
    as `load_dataset("local/toy")` leaves it after a download: <cache>/local___toy/default/<version>/<hash>."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    src, cache = tmp_path / "src", tmp_path / "datasets_cache"
    src.mkdir()
    pq.write_table(pa.table({"text": ["first train row", "second train row"]}), src / "train.parquet")
    pq.write_table(pa.table({"text": ["a validation row"]}), src / "validation.parquet")
    builder = Parquet(cache_dir=str(cache), dataset_name="toy", config_name="default", hash="0" * 16,
                      data_files={"train": str(src / "train.parquet"), "validation": str(src / "validation.parquet")})
    builder.download_and_prepare()
    (config_dir,) = (cache / "toy").iterdir()  # "default-<data files hash>" for a local builder
    (cache / "local___toy").mkdir()
    config_dir.rename(cache / "local___toy" / "default")
    return cache


def test_a_dataset_name_resolves_from_the_local_cache_and_nothing_is_downloaded(hf_cache: Path) -> None:
    train = load_records("local/toy", cache_dir=str(hf_cache))
    assert train.column("text") == ["first train row", "second train row"]
    assert load_records("local/toy", split="validation", cache_dir=str(hf_cache)).column("text") == ["a validation row"]
    with pytest.raises(DataError, match=rf"local/absent: not a file.*looked in {hf_cache}.*Nothing is downloaded"):
        load_records("local/absent", cache_dir=str(hf_cache))
    with pytest.raises(DataError, match=r"local/toy: .*config 'other'"):
        load_records("local/toy", config="other", cache_dir=str(hf_cache))


def test_a_json_array_file_and_a_bom_load_and_a_text_field_wins_over_conversations(tmp_path: Path, cache: str) -> None:
    # Stanford's alpaca_data.json: one array over many lines.
    rows = [{"instruction": "i1", "input": "", "output": "o1"}, {"instruction": "i2", "input": "x", "output": "o2"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows, indent=2))
    assert load_records(tmp_path / "alpaca.json", cache_dir=cache).column("output") == ["o1", "o2"]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')  # Windows tools
    assert load_records(tmp_path / "bom.jsonl", cache_dir=cache).column("text") == ["a", "b"]
    both = [{"text": "plain", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    assert load_records(write_jsonl(tmp_path / "both.jsonl", both), cache_dir=cache).style == "text"
    odd = [{"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]}]
    with pytest.raises(DataError, match=r"odd.jsonl: line 1: field 'conversations'.*string 'role'"):
        load_records(write_jsonl(tmp_path / "odd.jsonl", odd), cache_dir=cache)
