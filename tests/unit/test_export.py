import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynasyn.errors import ExportWriteError, InvalidNameError, TargetExistsError
from dynasyn.export import (save_embedding, save_embeddings, save_safetensors, unique_name, validate_export_name,
                            write_atomic)


@pytest.mark.parametrize("name", ["subjects", "my_run-2", "v1.5_asset0", "_x", "A" * 100])
def test_valid_names_pass(name):
    assert validate_export_name(name) == name


@pytest.mark.parametrize("name, why", [
    ("a/b", "path separator"), ("a\\b", "path separator"), ("..", ".."), ("x..y", ".."),
    ("two words", "whitespace"), ("tab\tname", "whitespace"), ("", "empty"), ("   ", "empty"),
    ("weight:1.2", "':'"), ("(name)", "'('"), ("a,b", "','"), ("<asset0>", "'<'"), ("é", "'é'"),
    ("-lead", "leading"), ("CON", "reserved"), ("nul.txt", "reserved"), ("dot.", "ends with"), ("A" * 101, "longer"),
])
def test_bad_names_are_refused_with_the_reason(name, why):
    with pytest.raises(InvalidNameError) as e:
        validate_export_name(name, "embedding")
    msg = str(e.value)
    assert "embedding name" in msg and why in msg
    if name.strip():
        assert repr(name) in msg  # says which name was refused


def test_embedding_is_written_in_load_embed_format(tmp_path):
    vec = torch.randn(2, 768)
    path = save_embedding(tmp_path, "panda", vec, {"dynasyn.token": "<asset0>"})
    assert path == tmp_path / "panda.safetensors"
    data = load_file(path)
    assert list(data) == ["emb_params"]
    assert data["emb_params"].dtype == torch.float32 and data["emb_params"].shape == (2, 768)
    torch.testing.assert_close(data["emb_params"], vec)
    one = save_embedding(tmp_path, "bowl", torch.randn(1024))
    assert load_file(one)["emb_params"].shape == (1, 1024)
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp"))


def test_existing_target_is_never_overwritten(tmp_path):
    (tmp_path / "panda.safetensors").write_bytes(b"precious")
    with pytest.raises(TargetExistsError, match="already exists"):
        save_embedding(tmp_path, "panda", torch.randn(768))
    assert (tmp_path / "panda.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panda.safetensors"]


def test_save_embeddings_checks_every_target_before_writing_any(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"old")
    with pytest.raises(TargetExistsError):
        save_embeddings(tmp_path, {"a": torch.randn(768), "b": torch.randn(768)})
    assert not (tmp_path / "a.safetensors").exists()


def test_failed_write_leaves_no_partial_file(tmp_path):
    def failing_writer(tmp: Path):
        tmp.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with pytest.raises(ExportWriteError, match="No space left on device"):
        write_atomic(tmp_path / "ckpt.safetensors", failing_writer)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_gets_a_clear_error(tmp_path):
    blocker = tmp_path / "models"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(ExportWriteError, match="Cannot create the folder"):
        save_embedding(blocker / "embeddings", "panda", torch.randn(768))
    assert blocker.read_text().startswith("a file")


def test_read_only_folder_gets_a_clear_error(tmp_path):
    # Root ignores permission bits (CI runs as root), so there the folder is read-only by construction:
    # procfs refuses writes to /proc/sys/kernel to everyone without CAP_SYS_ADMIN over the whole host.
    if os.geteuid() == 0:
        ro, restore = Path("/proc/sys/kernel"), None
        assert ro.is_dir() and not os.access(ro, os.W_OK)
    else:
        ro, restore = tmp_path / "ro", 0o755
        ro.mkdir()
        ro.chmod(0o555)
    try:
        with pytest.raises(ExportWriteError, match="not writable"):
            save_embedding(ro, "panda", torch.randn(768))
        assert not (ro / "panda.safetensors").exists()
    finally:
        if restore:
            ro.chmod(restore)


def test_non_finite_embedding_is_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        save_embedding(tmp_path, "bad", torch.tensor([float("nan"), 1.0]))
    assert list(tmp_path.iterdir()) == []


def test_unique_name_counts_up(tmp_path):
    assert unique_name(tmp_path, "run") == "run"
    (tmp_path / "run.safetensors").write_bytes(b"")
    (tmp_path / "run_001.safetensors").write_bytes(b"")
    assert unique_name(tmp_path, "run") == "run_002"


def test_safetensors_files_are_byte_reproducible(tmp_path):
    """The same tensors and metadata give the same bytes: safetensors itself writes the metadata in a random order
    (safetensors issue 584), so without sorting two saves of one model have different sha256s."""
    import json
    import struct

    from safetensors import safe_open

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    meta = {f"key{i:02d}": f"value {i} é" for i in range(16)}
    files = []
    for i in range(6):
        save_safetensors(tensors, tmp_path / f"{i}.safetensors", dict(reversed(meta.items())) if i % 2 else meta)
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(set(files)) == 1
    (n,) = struct.unpack("<Q", files[0][:8])
    assert n % 8 == 0
    assert list(json.loads(files[0][8:8 + n])["__metadata__"]) == sorted(meta)
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == meta
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
