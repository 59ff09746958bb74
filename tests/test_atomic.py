"""Atomic files: a failed write leaves the old file and no temporary behind; a good one replaces
it whole, readable by others."""

from __future__ import annotations

import stat

import pytest

from crma_jax.atomic import atomic_file, write_text


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="cut"):
        with atomic_file(target) as f:
            f.write(b"half of the new")
            raise ValueError("cut")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_file(target) as f:
        f.write(b"new")
        assert target.read_bytes() == b"old"  # nothing shows until the block ends
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_text_that_fails_half_way_leaves_the_old_file(tmp_path):
    target = tmp_path / "remat.json"
    write_text(target, '{"policy": "full"}')
    with pytest.raises(UnicodeEncodeError):
        write_text(target, '{"policy": "\udcff"}')  # a lone surrogate: encoding fails after the file is open
    assert target.read_text() == '{"policy": "full"}' and [p.name for p in tmp_path.iterdir()] == ["remat.json"]
