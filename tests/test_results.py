"""Result files: atomic writes keep the old content on failure and leave no temp files."""

from __future__ import annotations

import json

import pytest

from gpunet_core.utils.files import atomic_write, write_json


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json({"a": 1}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError), atomic_write(target) as fh:
        fh.write('{"half": ')
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"a": 1}  # old content kept
    with pytest.raises(TypeError):
        write_json({"not json": object()}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temp files
    with atomic_write(target, "wb", fsync=True) as fh:
        fh.write(b"{}")
    assert target.read_bytes() == b"{}"
