"""Checkpoints are written atomically."""

import pytest
import torch

from disttrain.train import checkpoint


def test_save_then_load_returns_the_state(tmp_path):
    checkpoint.save_atomic({"step": 3, "w": torch.arange(4)}, tmp_path / "c.pt")
    state = checkpoint.load(tmp_path / "c.pt")
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4))


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"step": 1}, path)

    def broken_save(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"step": 2}, path)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_loading_a_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.pt.* not found"):
        checkpoint.load(tmp_path / "missing.pt")
