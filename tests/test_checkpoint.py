"""Checkpoint manifests: a damaged newest checkpoint is skipped for the previous intact one, an
unreadable trainer state counts as damage, and a damaged model is never published."""

import json

import pytest

from lastmile import checkpoint
from lastmile.errors import UserError


def _fake_checkpoint(root, step, payload=b"x" * 1000):
    d = root / f"step-{step:07d}"
    (d / "engine").mkdir(parents=True)
    (d / "model").mkdir()
    (d / "engine" / "shard.pt").write_bytes(payload)
    (d / "model" / "config.json").write_text("{}")
    (d / "model" / "model.safetensors").write_bytes(payload)
    checkpoint.write_manifest(d / "model")
    (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    checkpoint.write_manifest(d)
    return d


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    old, new = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    assert checkpoint.latest_checkpoint(tmp_path) == new
    with open(new / "engine" / "shard.pt", "r+b") as f:
        f.truncate(10)
    assert checkpoint.latest_checkpoint(tmp_path) == old
    assert "damaged" in caplog.text and "shard.pt has 10 bytes, 1000 expected" in caplog.text


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path):
    old, new = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    (new / "model" / "model.safetensors").write_bytes(b"y" * 1000)
    assert checkpoint.latest_checkpoint(tmp_path) == old


def test_empty_trainer_state_is_damage_not_a_traceback(tmp_path):
    old, new = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    (new / checkpoint.STATE_FILE).write_text("")
    assert checkpoint.latest_checkpoint(tmp_path) == old
    (old / checkpoint.STATE_FILE).write_text("")
    assert checkpoint.latest_checkpoint(tmp_path) is None


def test_a_damaged_model_is_never_published(tmp_path):
    ck = _fake_checkpoint(tmp_path, 2)
    dest = tmp_path / "model"
    checkpoint.publish_model(ck / "model", dest)
    assert checkpoint.verify_manifest(dest) == [] and (dest / "model.safetensors").stat().st_size == 1000
    with open(ck / "model" / "model.safetensors", "r+b") as f:
        f.truncate(3)
    with pytest.raises(UserError, match="the model to publish is damaged"):
        checkpoint.publish_model(ck / "model", tmp_path / "model2")
    assert not (tmp_path / "model2").exists()
