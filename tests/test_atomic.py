"""Atomic outputs: whole or not at all, nothing left behind on failure, and the permissions of a plain
write (tempfile's private 0600 / 0700 must not leak into exports other users or servers read)."""

from __future__ import annotations

import os
import stat

import pytest

from tunery.atomic import atomic_output, write_text


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_outputs_get_the_umask_permissions(tmp_path, umask_027):
    write_text(tmp_path / "a.json", "{}")
    assert _mode(tmp_path / "a.json") == 0o640
    with atomic_output(tmp_path / "folder", folder=True) as tmp:
        (tmp / "w.bin").write_bytes(b"x")
    assert _mode(tmp_path / "folder") == 0o750 and (tmp_path / "folder" / "w.bin").read_bytes() == b"x"


def test_a_failed_write_keeps_the_old_output_and_leaves_no_temp(tmp_path):
    out = tmp_path / "adapter"
    with atomic_output(out, folder=True) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_output(out, folder=True) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "f.txt") as tmp:
        raise RuntimeError("interrupted")
    assert (out / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic_output(out, folder=True, sync=True) as tmp:  # a finished write replaces the folder whole
        (tmp / "w").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["w"]


def test_exports_are_readable_by_others(tiny_llama, tmp_path, umask_027):
    """An adapter, a merged folder and a GGUF file get 0750 / 0640 under umask 027 (not 0700 / 0600)."""
    from tunery.adapters import inject_lora, save_adapter
    from tunery.export import gguf_from_folder, save_model_folder
    from tunery.models import load_model

    lm = load_model(str(tiny_llama))
    inject_lora(lm.model, ["q_proj"], r=2, alpha=4)
    assert _mode(save_adapter(lm.model, tmp_path / "adapter", str(tiny_llama))) == 0o750
    merged = save_model_folder(lm.model, tiny_llama, lm.tokenizer, tmp_path / "merged")
    assert _mode(merged) == 0o750 and _mode(merged / "config.json") == 0o640
    gguf = gguf_from_folder(merged, tmp_path / "m.gguf", "f16")
    assert _mode(gguf) == 0o640
