"""bench/blind_manifest.py: the blind predictions' README names each file's model, ids and sha256, and
refuses a folder whose files were made differently or cover different documents."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from conftest import TINY

from lastmile.config import load_config
from lastmile.stages import predict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import blind_manifest  # noqa: E402


def _write(folder: Path, system: str, ids: list[str], *, model: str, overrides: tuple[str, ...] = (),
           post: bool = True) -> None:
    """What `lastmile predict` leaves: <system>.jsonl, its .meta.json (the real producer record), a +post file."""
    cfg = load_config(TINY, list(overrides))
    lines = "".join(json.dumps({"id": i, "prediction": f"{system} summary of {i}"}) + "\n" for i in ids)
    (folder / f"{system}.jsonl").write_text(lines)
    meta = predict._producer(cfg, model, torch.device("cpu")) | {"input": "blind.jsonl"}
    (folder / f"{system}.jsonl.meta.json").write_text(json.dumps(meta))
    if post:
        (folder / f"{system}+post.jsonl").write_text(lines)


def test_readme_names_model_ids_and_hash_of_every_file(tmp_path):
    ids = ["a", "b", "c"]
    _write(tmp_path, "mle", ids, model="smollm2-135m-instruct")
    _write(tmp_path, "rl", ids, model="some/hub-model")
    code = blind_manifest.main([str(tmp_path), "--config", "cfg.yaml", "--input", "blind.jsonl", "--commit", "abc123"])
    assert code == 0
    readme = (tmp_path / "README.md").read_text()
    assert "commit `abc123`" in readme and "`cfg.yaml`" in readme
    sha = hashlib.sha256((tmp_path / "rl.jsonl").read_bytes()).hexdigest()[:16]
    assert f"| `rl.jsonl` | rl | `some/hub-model [name:some/hub-model]` | 3 | `{sha}` |" in readme
    assert "| `mle+post.jsonl` | mle+post | `mle.jsonl` post-processed | 3 |" in readme
    assert readme.count("\n| `") == 4  # two systems, raw and post-processed
    assert "- `eval.generation.strategy`: greedy" in readme


def test_refuses_files_made_with_other_decoding(tmp_path, capsys):
    _write(tmp_path, "mle", ["a", "b"], model="smollm2-135m-instruct")
    _write(tmp_path, "rl", ["a", "b"], model="smollm2-135m-instruct", overrides=("eval.generation.max_new_tokens=7",))
    assert blind_manifest.main([str(tmp_path), "--config", "c", "--input", "i"]) == 2
    err = capsys.readouterr().err
    assert "rl.jsonl was made with other prompt or decoding settings" in err and "eval.generation.max_new_tokens" in err
    assert not (tmp_path / "README.md").exists()


def test_refuses_different_ids_and_a_file_without_its_meta(tmp_path, capsys):
    _write(tmp_path, "mle", ["a", "b"], model="smollm2-135m-instruct")
    _write(tmp_path, "rl", ["a", "c"], model="smollm2-135m-instruct")
    assert blind_manifest.main([str(tmp_path), "--config", "c", "--input", "i"]) == 2
    assert "hold different ids (2 differ)" in capsys.readouterr().err

    (tmp_path / "rl.jsonl").write_text(json.dumps({"id": "b", "prediction": "x"}) + "\n"
                                       + json.dumps({"id": "a", "prediction": "y"}) + "\n")
    (tmp_path / "rl+post.jsonl").unlink()
    (tmp_path / "rl.jsonl.meta.json").unlink()
    assert blind_manifest.main([str(tmp_path), "--config", "c", "--input", "i"]) == 2
    assert "rl.jsonl has no rl.jsonl.meta.json beside it" in capsys.readouterr().err


def test_every_file_must_hold_each_id_of_the_input(tmp_path, capsys):
    docs = tmp_path / "blind.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "document": f"text {i}"}) + "\n" for i in ("a", "b", "c")))
    folder = tmp_path / "out"
    folder.mkdir()
    _write(folder, "mle", ["a", "b"], model="smollm2-135m-instruct")
    assert blind_manifest.main([str(folder), "--config", "c", "--input", str(docs)]) == 2
    assert "mle.jsonl does not hold exactly the input's 3 ids (1 missing, 0 not in the input)" in capsys.readouterr().err
    _write(folder, "mle", ["a", "b", "c"], model="smollm2-135m-instruct")
    assert blind_manifest.main([str(folder), "--config", "c", "--input", str(docs)]) == 0
