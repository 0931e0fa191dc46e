"""Predictions files: JSONL of {"id": ..., "prediction": "..."}, read strictly.

Read as UTF-8 and split on "\\n" only, so a prediction holding U+2028 (valid inside a JSON string)
cannot break a line. Every problem names the file and line: invalid JSON, a missing or non-string
prediction, a duplicate or unknown id, and (unless missing="empty") examples without a prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.data.records import Example
from trainer.errors import DataError


def read_predictions(path: Path, examples: list[Example], *, missing: str = "error") -> list[str]:
    """Predictions in example order. missing="empty" scores examples without a prediction as ""."""
    known = {e.id for e in examples}
    by_id: dict[str, tuple[str, int]] = {}
    unknown: list[str] = []
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read: {e.strerror}. Check the path given as the predictions file.") from None
    for n, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} line {n} is not UTF-8 text. Save the file as UTF-8.") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not valid JSON ({e.msg}). Write one JSON object per line.") from None
        if not isinstance(row, dict) or "id" not in row or "prediction" not in row:
            raise DataError(f"{path} line {n}: expected a JSON object with \"id\" and \"prediction\".")
        if not isinstance(row["prediction"], str):
            raise DataError(f"{path} line {n}: \"prediction\" is {json.dumps(row['prediction'])[:40]}, not a string. "
                            "Write the summary text (an empty string for no output).")
        ex_id = str(row["id"])
        if ex_id in by_id:
            raise DataError(f"{path} line {n}: id {ex_id} already has a prediction on line {by_id[ex_id][1]}. "
                            "Keep one prediction per id.")
        if ex_id not in known:
            unknown.append(ex_id)
        by_id[ex_id] = (row["prediction"], n)
    if unknown:
        raise DataError(f"{path} has predictions for {len(unknown)} ids that are not evaluation examples (first: "
                        f"{', '.join(unknown[:5])}). Check data.source and data.eval_split.")
    absent = [e.id for e in examples if e.id not in by_id]
    if absent and missing != "empty":
        raise DataError(
            f"{path} has no prediction for {len(absent)} of {len(examples)} evaluation examples "
            f"(first: {', '.join(absent[:5])}). Predict every id of data.eval_split, or limit eval.max_examples."
        )
    return [by_id[e.id][0] if e.id in by_id else "" for e in examples]
