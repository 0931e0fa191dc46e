"""The strict predictions reader: every malformed file is a DataError naming the file and line."""

from __future__ import annotations

import json

import pytest

from lastmile.data.predictions import read_predictions
from lastmile.data.records import Example
from lastmile.errors import DataError

EXAMPLES = [Example(i, f"document {i}", f"summary {i}", (f"summary {i}",)) for i in ("a", "b", "c")]


def _write(tmp_path, lines: list[str] | bytes):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(lines if isinstance(lines, bytes) else "".join(x + "\n" for x in lines).encode("utf-8"))
    return path


def _row(ex_id, prediction) -> str:
    return json.dumps({"id": ex_id, "prediction": prediction})


def _error(tmp_path, lines, **kwargs) -> str:
    path = _write(tmp_path, lines)
    with pytest.raises(DataError) as e:
        read_predictions(path, EXAMPLES, **kwargs)
    assert str(path) in str(e.value)
    return str(e.value)


def test_reads_in_example_order_with_unicode_line_separators_and_blank_lines(tmp_path):
    # U+2028/U+2029/U+0085 are legal unescaped inside a JSON string; str.splitlines would cut the line there.
    odd = "first part\u2028second part\u2029third\x85 end"
    lines = [json.dumps({"id": "c", "prediction": odd}, ensure_ascii=False), "", "   ",
             _row("a", "alpha"), json.dumps({"id": "b", "prediction": "ünïcödé", "extra": 1}, ensure_ascii=False)]
    assert read_predictions(_write(tmp_path, lines), EXAMPLES) == ["alpha", "ünïcödé", odd]


def test_crlf_line_endings_lone_cr_and_byte_order_mark_are_accepted(tmp_path):
    # A lone "\r" is JSON whitespace, not a line end (open(newline="") would split the line there).
    body = "\ufeff" + _row("a", "x") + "\r\n" + _row("b", "y") + "\r\n" + '{"id": "c",\r"prediction": ""}\r\n'
    assert read_predictions(_write(tmp_path, body.encode("utf-8")), EXAMPLES) == ["x", "y", ""]


def test_integer_ids_match_string_example_ids(tmp_path):
    examples = [Example("7", "d", "s", ("s",))]
    assert read_predictions(_write(tmp_path, ['{"id": 7, "prediction": "p"}']), examples) == ["p"]


def test_invalid_json(tmp_path):
    msg = _error(tmp_path, [_row("a", "x"), '{"id": "b" "prediction": "y"}', _row("c", "z")])
    assert "has 1 unusable line(s):\n  line 2 is not valid JSON (Expecting ',' delimiter at character 12)." in msg


def test_not_an_object(tmp_path):
    msg = _error(tmp_path, [_row("a", "x"), '["b", "y"]', '"c"'])
    assert "line 2 is an array, not a JSON object." in msg and "line 3 is a string, not a JSON object." in msg
    assert "has 2 unusable line(s)" in msg


def test_missing_fields(tmp_path):
    msg = _error(tmp_path, ['{"prediction": "x"}', '{"id": "b", "text": "y"}'])
    assert 'line 1: no "id" field (fields: prediction).' in msg
    assert 'line 2: no "prediction" field (fields: id, text).' in msg


def test_null_and_non_string_values(tmp_path):
    msg = _error(tmp_path, [_row("a", None), _row("b", ["a"]), _row(None, "z")])
    assert 'line 1: "prediction" is null, not a string.' in msg
    assert 'line 2: "prediction" is ["a"], not a string.' in msg
    assert 'line 3: "id" is null, not a string or an integer.' in msg


def test_duplicate_id_names_both_lines(tmp_path):
    msg = _error(tmp_path, [_row("a", "x"), _row("b", "y"), _row("c", "z"), _row("a", "again")])
    assert "line 4: id a already has a prediction on line 1." in msg


def test_unknown_ids_report_the_first_few_with_lines(tmp_path):
    lines = [_row(i, "x") for i in ("a", "b", "c", "z1", "z2", "z3", "z4", "z5", "z6")]
    msg = _error(tmp_path, lines)
    assert "has predictions for 6 ids that are not evaluation examples (first: z1, z2, z3, z4, z5). " \
           "They are on line(s) 4, 5, 6, 7, 8." in msg


def test_non_utf8_bytes_name_the_line(tmp_path):
    body = (_row("a", "x") + "\n").encode() + b'{"id": "b", "prediction": "caf\xe9"}\n' + (_row("c", "z") + "\n").encode()
    msg = _error(tmp_path, body)
    assert "has 1 unusable line(s):\n  line 2 is not UTF-8 text (byte 0xe9 at character 31)." in msg


def test_missing_predictions_are_an_error_unless_scored_empty(tmp_path):
    msg = _error(tmp_path, [_row("b", "y")])
    assert "has no prediction for 2 of 3 evaluation examples (first: a, c)." in msg
    assert read_predictions(_write(tmp_path, [_row("b", "y")]), EXAMPLES, missing="empty") == ["", "y", ""]


def test_every_bad_line_is_reported_at_once(tmp_path):
    msg = _error(tmp_path, ["nope"] * 25)
    assert "has 25 unusable line(s)" in msg and "line 20 is not valid JSON" in msg
    assert "line 21 is" not in msg and "... and 5 more" in msg


def test_unreadable_file_and_bad_policy(tmp_path):
    with pytest.raises(DataError, match="cannot be read: No such file or directory"):
        read_predictions(tmp_path / "absent.jsonl", EXAMPLES)
    with pytest.raises(ValueError, match="missing"):
        read_predictions(_write(tmp_path, [_row("a", "x")]), EXAMPLES, missing="skip")
