"""`lastmile predict`: JSONL, CSV and Parquet in, `{"id", "prediction"}` JSONL out; a partial output
is completed (only the missing ids are generated, the lines written are kept); bad input is one
clear message, exit code 2, no traceback, nothing written. Runs the CLI in this process with a
tiny random model published to a folder (no network)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY

from lastmile.cli import main
from lastmile.stages import predict

DOCS = [{"id": i, "document": f"Paper {n}: we study {topic} and report that it works. " * 3}
        for n, (i, topic) in enumerate([("d1", "parsing"), ("d2", "tagging"), ("007", "retrieval"),
                                        ("d4", "translation"), ("d5", "summaries")])]
IDS = [d["id"] for d in DOCS]
FAST = ["predict.batch_size=2", "eval.generation.max_new_tokens=6"]


@pytest.fixture(scope="module")
def published(tiny_lm, tokenizer, tmp_path_factory) -> Path:
    """The tiny random model saved as a published model folder (weights, config, tokenizer)."""
    folder = tmp_path_factory.mktemp("published") / "model"
    tiny_lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _predict(model, source, *extra) -> int:
    return main(["predict", "--config", str(TINY), f"predict.model={model}", f"predict.input={source}", *FAST, *extra])


def test_every_format_gives_the_same_predictions(published, tmp_path, capsys):
    got = {}
    for suffix in (".jsonl", ".csv", ".parquet"):
        source = _write(tmp_path / f"docs{suffix}", DOCS)
        assert _predict(published, source) == 0, capsys.readouterr().err[-2000:]
        out = tmp_path / "docs.predictions.jsonl"  # the default: next to the input
        rows = _lines(out)
        assert [r["id"] for r in rows] == IDS  # in input order; CSV's `007` stays text
        assert all(isinstance(r["prediction"], str) for r in rows)
        meta = json.loads((tmp_path / "docs.predictions.jsonl.meta.json").read_text())
        assert meta["settings"]["eval.generation.max_new_tokens"] == 6
        got[suffix] = rows
        out.unlink()
    assert got[".jsonl"] == got[".csv"] == got[".parquet"]


def test_postprocessed_output_is_the_reports_post_processing(published, tmp_path, capsys, monkeypatch):
    from lastmile import metrics

    source = _write(tmp_path / "docs.jsonl", DOCS)
    post = tmp_path / "post" / "docs+post.jsonl"
    monkeypatch.setattr(metrics, "postprocess", lambda text: f"<{text}>")  # visible, whatever the tiny model writes
    assert _predict(published, source, f"predict.postprocessed_output={post}") == 0, capsys.readouterr().err[-2000:]
    raw = _lines(tmp_path / "docs.predictions.jsonl")
    assert _lines(post) == [{"id": r["id"], "prediction": f"<{r['prediction']}>"} for r in raw]
    post.unlink()  # a rerun with nothing left to generate still writes it
    assert _predict(published, source, f"predict.postprocessed_output={post}") == 0
    assert "already holds all 5 documents" in capsys.readouterr().out and len(_lines(post)) == 5


def test_partial_output_is_completed_keeping_its_lines(published, tmp_path, monkeypatch, capsys):
    source = _write(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "preds.jsonl"
    assert _predict(published, source, f"predict.output={out}") == 0
    full = _lines(out)
    # As a kill leaves it: two whole lines (marked, to see that they are kept, not regenerated) and a torn third.
    kept = [{"id": r["id"], "prediction": f"KEPT {r['id']}"} for r in full[:2]]
    torn = json.dumps(full[2]).encode()[:15]
    out.write_bytes("".join(json.dumps(r) + "\n" for r in kept).encode() + torn)
    generated = []
    real = predict.generate

    def recording(lm, tokenizer, prompts, *args, **kwargs):
        generated.extend(p.id for p in prompts)
        return real(lm, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(predict, "generate", recording)
    assert _predict(published, source, f"predict.output={out}", "predict.batch_size=1") == 0  # batch size may change
    assert generated == IDS[2:]
    assert _lines(out) == kept + full[2:]
    generated.clear()
    assert _predict(published, source, f"predict.output={out}") == 0
    assert generated == [] and "already holds all 5 documents" in capsys.readouterr().out


def test_resume_is_refused_when_what_produced_the_output_changed(published, tmp_path, capsys):
    source = _write(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "preds.jsonl"
    assert _predict(published, source, f"predict.output={out}") == 0
    out.write_text("".join(json.dumps(r) + "\n" for r in _lines(out)[:2]))
    before = out.read_bytes()
    changed = "was written with other settings: "
    cases = [(["eval.generation.max_new_tokens=7"], changed + "eval.generation.max_new_tokens (6 -> 7)"),
             (["predict.model=smollm2-135m-instruct"], changed + "predict.model (")]
    for extra, expected in cases:
        assert _predict(published, source, f"predict.output={out}", *extra) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
        assert out.read_bytes() == before
    other = _write(tmp_path / "other.jsonl", DOCS[2:])  # the output holds d1 and d2, which other.jsonl lacks
    assert _predict(published, other, f"predict.output={out}") == 2
    err = capsys.readouterr().err
    assert "has predictions for 2 ids that are not in predict.input (first: d1, d2). It belongs to other" in err
    assert out.read_bytes() == before


def _case_files(t: Path) -> dict[str, Path]:
    return {
        "good": _write(t / "good.jsonl", DOCS),
        "txt": _write(t / "docs.txt", DOCS),
        "no-id": _write(t / "no_id.jsonl", [{"document": d["document"]} for d in DOCS]),
        "no-doc": _write(t / "no_doc.csv", [{"id": d["id"], "text": d["document"]} for d in DOCS]),
        "dup": _write(t / "dup.jsonl", DOCS + [DOCS[0]]),
        "empty-id": _write(t / "empty_id.parquet", [DOCS[0], {"id": " ", "document": "text"}]),
        "empty-file": _text(t / "empty.csv", "id,document\n"),
        "folder": t,
    }


# (case id, overrides given the case's files, expected message fragment)
BAD = [
    ("missing-file", lambda f: [f"predict.input={f['folder'] / 'absent.jsonl'}"], "absent.jsonl) does not exist."),
    ("unknown-extension", lambda f: [f"predict.input={f['txt']}"],
     "has an unknown extension (.txt). The extension picks the reader. Use a .jsonl, .csv, .parquet file"),
    ("no-id-column", lambda f: [f"predict.input={f['no-id']}"], "predict.id_field (id) is not a column of"),
    ("no-document-column", lambda f: [f"predict.input={f['no-doc']}"],
     "predict.document_field (document) is not a column of"),
    ("duplicate-ids", lambda f: [f"predict.input={f['dup']}"], "duplicate id 'd1' (line 1, line 6)"),
    ("empty-id", lambda f: [f"predict.input={f['empty-id']}"], "row 2: id field 'id' is empty"),
    ("empty-input", lambda f: [f"predict.input={f['empty-file']}"], "holds no documents"),
    ("model-missing", lambda f: [f"predict.input={f['good']}", f"predict.model={f['folder'] / 'nope'}"],
     "nope) does not exist. There is no model to load."),
    ("model-folder-empty", lambda f: [f"predict.input={f['good']}", f"predict.model={f['folder']}"],
     "is a folder without config.json"),
    ("unset", lambda f: ["predict.model=null"], "predict.model (unset) is required"),
    ("output-is-folder", lambda f: [f"predict.input={f['good']}", f"predict.output={f['folder']}"],
     "is a folder. Predictions go to one JSONL file."),
    ("zero-batch", lambda f: [f"predict.input={f['good']}", "predict.batch_size=0"],
     "predict.batch_size (0) must be greater than 0."),
    ("post-overwrites-input", lambda f: [f"predict.input={f['good']}", f"predict.postprocessed_output={f['good']}"],
     "is the input or the output file. It would overwrite them."),
    ("foreign-output", lambda f: [f"predict.input={f['good']}", f"predict.output={f['txt']}"],
     "line(s) that lastmile predict did not write"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_one_clear_message(case, tmp_path, capsys):
    _, overrides, expected = case
    files = _case_files(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = main(["predict", "--config", str(TINY), "predict.model=smollm2-135m-instruct", *overrides(files)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert expected in err, err[-2000:]
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_the_meta_records_the_concrete_precision(monkeypatch):
    """precision=auto is recorded as what it gives on this machine: a resume where it gives the other
    precision is refused (the producer differs) instead of mixing fp32 and bf16 lines in one file."""
    import torch

    from lastmile import distributed
    from lastmile.config import load_config

    cfg = load_config(TINY, ["precision=auto"])
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    here = predict._producer(cfg, "smollm2-135m-instruct", torch.device("cpu"))
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    there = predict._producer(cfg, "smollm2-135m-instruct", torch.device("cpu"))
    assert here["settings"]["precision"] == "fp32" and there["settings"]["precision"] == "bf16"
    assert here["hash"] != there["hash"]


def test_a_meta_from_before_the_concrete_precision_is_completed(tmp_path, caplog):
    """A `.meta.json` written before lastmile recorded the concrete precision says precision=auto: the
    file is completed (with a warning naming the assumption), not refused."""
    import torch

    from lastmile.config import load_config

    cfg = load_config(TINY, ["precision=auto"])
    producer = predict._producer(cfg, "smollm2-135m-instruct", torch.device("cpu"))
    old = {"hash": "0" * 16, "settings": {**producer["settings"], "precision": "auto"}, "input": "docs.jsonl"}
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"id": "a", "prediction": "x"}) + "\n")
    predict.meta_path(output).write_text(json.dumps(old))
    with caplog.at_level("WARNING"):
        done, _ = predict.read_done(output, producer, {"a", "b"})
    assert done == {"a": "x"} and "records precision=auto" in caplog.text
    other = {**old, "settings": {**old["settings"], "eval.generation.max_new_tokens": 3}}
    predict.meta_path(output).write_text(json.dumps(other))
    with pytest.raises(predict.DataError, match="was written with other settings"):
        predict.read_done(output, producer, {"a", "b"})
