import json

import pytest
from pathlib import Path

from lastmile.config import DataConfig, PromptConfig
from lastmile.data.collate import collate_prompts, collate_sft
from lastmile.data.prompts import PromptBuilder
from lastmile.data.records import detokenize, load_split
from lastmile.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_local_jsonl_with_references(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [
        {"id": "a", "document": "Doc A.", "summary": "Sum A.", "references": ["Sum A.", "Other A."]},
        {"id": "b", "document": "Doc B.", "summary": "Sum B."},
    ])
    ex = load_split(DataConfig(source=str(tmp_path)), "train")
    assert [e.id for e in ex] == ["a", "b"]
    assert ex[0].references == ("Sum A.", "Other A.") and ex[1].references == ("Sum B.",)


def test_csv_and_parquet_and_field_mapping(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"key": ["x", "y"], "article": ["Doc X.", "Doc Y."], "tldr": ["S X.", "S Y."]})
    df.to_csv(tmp_path / "train.csv", index=False)
    df.to_parquet(tmp_path / "validation.parquet")
    cfg = DataConfig(source=str(tmp_path), id_field="key", document_field="article", summary_field="tldr",
                     references_field=None)
    assert [e.summary for e in load_split(cfg, "train")] == ["S X.", "S Y."]
    assert [e.id for e in load_split(cfg, "validation")] == ["x", "y"]


def test_malformed_jsonl_reports_line_numbers(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"document": "d", "summary": "s"}, "{not json", "[1, 2]"])
    with pytest.raises(DataError) as e:
        load_split(DataConfig(source=str(tmp_path)), "train")
    assert "line 2: not valid JSON" in str(e.value) and "line 3: a JSON list" in str(e.value)


def test_empty_and_missing_fields_reported_by_row(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [
        {"document": "ok", "summary": "ok"}, {"document": "", "summary": "s"}, {"document": "d"},
        {"document": 42, "summary": "s"},
    ])
    with pytest.raises(DataError) as e:
        load_split(DataConfig(source=str(tmp_path)), "train")
    msg = str(e.value)
    assert "3 of 4 rows" in msg and "row 2 (line 2): field 'document' is empty" in msg
    assert "row 3 (line 3): field 'summary' is missing" in msg and "data.document_field" in msg
    assert "row 4 (line 4): field 'document' is an int (42), not text" in msg  # a wrong type is not "missing"


def test_missing_split_names_the_files_there(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"document": "d", "summary": "s"}])
    with pytest.raises(DataError, match="Files there: train.jsonl"):
        load_split(DataConfig(source=str(tmp_path)), "validation")


def test_aclsum_offline_default():
    train = load_split(DataConfig(), "train")
    val = load_split(DataConfig(), "validation")
    assert len(train) == 100 and len(val) == 50
    assert not set(e.id for e in train) & set(e.id for e in val)
    assert " ," not in train[0].document and " ." not in train[0].document
    assert len(train[0].summary.split()) > 10


def test_detokenize():
    assert detokenize("results , in ( 20 % ) do n't `` x '' .") == 'results, in (20%) don\'t "x".'


def test_prompt_uses_chat_template_and_truncates(tokenizer):
    builder = PromptBuilder(tokenizer, PromptConfig(max_document_tokens=5, max_summary_tokens=3))
    ids, truncated = builder.prompt_ids("one two three four five six seven eight nine ten")
    text = tokenizer.decode(ids)
    assert truncated and "<|im_start|>assistant" in text and "seven" not in text
    resp, cut = builder.response_ids("alpha beta gamma delta epsilon")
    assert cut and len(resp) == 4 and resp[-1] == tokenizer.eos_token_id


def test_plain_template_for_base_models(tokenizer):
    builder = PromptBuilder(tokenizer, PromptConfig(style="plain"))
    text, _ = builder.prompt_text("A document.")
    assert text.endswith("A document.\n\nSummary:") and "<|im_start|>" not in text


def test_collate_masks():
    from lastmile.data.prompts import TokenizedExample

    exs = [TokenizedExample("a", (1, 2, 3), (4, 5)), TokenizedExample("b", (1,), (6,))]
    b = collate_sft(exs, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 6, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[True] * 5, [True, True, False, False, False]]
    assert b.target_mask.tolist() == [[False, False, False, True, True], [False, True, False, False, False]]
    p = collate_prompts(exs, pad_id=0)
    assert p.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 1]] and p.prompt_mask.tolist()[1] == [False, False, True]


def test_hub_source_maps_fields(monkeypatch):
    """hub:<name> goes through datasets.load_dataset (stubbed: no hub here) with config and split."""
    import datasets

    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return [{"paper_id": "p1", "source": "Doc.", "target": ["T1.", "T2."]}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(source="hub:allenai/scitldr", hub_config="Abstract", id_field="paper_id", document_field="source",
                     summary_field="title", references_field="target")
    with pytest.raises(DataError, match="'title'"):
        load_split(cfg, "train")
    cfg = DataConfig(source="hub:allenai/scitldr", hub_config="Abstract", id_field="paper_id", document_field="source",
                     summary_field="source", references_field="target")
    ex = load_split(cfg, "validation")
    assert calls[-1] == ("allenai/scitldr", "Abstract", "validation") and ex[0].references == ("T1.", "T2.")


def test_missing_model_is_a_clear_error(tmp_path):
    from lastmile.errors import ModelError
    from lastmile.models import resolve_model_path

    with pytest.raises(ModelError, match=r"model.path \(./nope.gguf\) does not exist"):
        resolve_model_path("./nope.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="folder without config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_split_parts_follow_a_fixed_rule_on_ids(tmp_path):
    import hashlib

    from lastmile.config import splits_overlap

    rows = [{"id": f"p{i}", "document": f"Doc {i}.", "summary": f"Sum {i}."} for i in range(40)]
    _write_jsonl(tmp_path / "validation.jsonl", rows)
    cfg = DataConfig(source=str(tmp_path), dev_fraction=0.5)
    dev, report = load_split(cfg, "validation@dev"), load_split(cfg, "validation@report")
    ids = {r["id"] for r in rows}
    assert {e.id for e in dev} | {e.id for e in report} == ids and not {e.id for e in dev} & {e.id for e in report}
    expected = {i for i in ids if int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") < 2**63}
    assert {e.id for e in dev} == expected
    _write_jsonl(tmp_path / "validation.jsonl", list(reversed(rows)))  # the rule ignores file order
    assert {e.id for e in load_split(cfg, "validation@dev")} == expected
    assert splits_overlap("validation", "validation@report") and splits_overlap("validation@dev", "validation@dev")
    assert not splits_overlap("validation@dev", "validation@report") and not splits_overlap("validation", "test")


def test_holdout_part_is_a_second_salted_rule(tmp_path):
    import hashlib

    from lastmile.config import splits_overlap

    rows = [{"id": f"p{i}", "document": f"Doc {i}.", "summary": f"Sum {i}."} for i in range(200)]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(source=str(tmp_path), holdout_fraction=0.15, holdout_salt="v2")
    fit, held = load_split(cfg, "train@fit"), load_split(cfg, "train@holdout")
    ids = {r["id"] for r in rows}
    assert {e.id for e in fit} | {e.id for e in held} == ids and not {e.id for e in fit} & {e.id for e in held}
    expected = {i for i in ids if int.from_bytes(hashlib.sha256(f"v2:{i}".encode()).digest()[:8], "big") < 0.15 * 2**64}
    assert {e.id for e in held} == expected and 10 < len(expected) < 50
    other_salt = {e.id for e in load_split(DataConfig(source=str(tmp_path), holdout_fraction=0.15), "train@holdout")}
    assert other_salt != expected  # a new salt carves a new part
    assert not splits_overlap("train@fit", "train@holdout")
    assert splits_overlap("train@dev", "train@holdout") and splits_overlap("train", "train@holdout")


def test_fitting_on_the_reported_split_or_an_unset_holdout_rule_is_refused():
    from lastmile.config import load_config
    from lastmile.errors import ConfigError

    tiny = ROOT / "trainer" / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"data.train_split \(train\) overlaps data.eval_split \(train@holdout\)"):
        load_config(tiny, ["data.train_split=train", "data.eval_split=train@holdout", "data.holdout_fraction=0.2"])
    with pytest.raises(ConfigError, match=r"data.holdout_fraction \(None\) is not in \(0, 1\)"):
        load_config(tiny, ["data.train_split=train@fit", "data.eval_split=train@holdout"])
    load_config(tiny, ["data.train_split=train@fit", "data.eval_split=train@holdout", "data.holdout_fraction=0.2"])
