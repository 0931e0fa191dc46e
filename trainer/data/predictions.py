"""Predictions files: JSONL of {"id": ..., "prediction": "..."}, read strictly.

One JSON object per line, UTF-8. Lines are split on "\\n" only, never with str.splitlines, so a
prediction holding U+2028, U+2029 or U+0085 (which JSON allows unescaped inside a string) cannot
break a line. Blank lines are skipped. Every malformed line is reported at once, by line number:
invalid JSON or UTF-8, not an object, a missing or non-string "id" or "prediction", a duplicate id.
Then ids that are not evaluation examples, then (unless missing="empty") examples without a
prediction.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lastmile.data.records import Example
from lastmile.errors import DataError

MISSING_POLICIES = ("error", "empty")
MAX_REPORTED_LINES = 20
MAX_REPORTED_IDS = 5
_JSON_WHITESPACE = " \t\r\n"
# Undecodable bytes, as errors="surrogateescape" hands them back; valid UTF-8 never decodes to these.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


class _BadLine(Exception):
    """One line's problem, as the message fragment that names the line."""


def read_predictions(path: Path, examples: list[Example], *, missing: str = "error") -> list[str]:
    """Predictions in example order. missing="empty" scores examples without a prediction as "".

    Raises DataError naming `path` and the line(s) at fault.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing ({missing!r}) must be one of {MISSING_POLICIES}")
    known = {e.id for e in examples}
    found: dict[str, tuple[str, int]] = {}  # id -> (prediction, line number)
    problems: list[str] = []
    unknown: list[tuple[str, int]] = []
    try:
        # newline="\n": lines end at "\n" only (newline="" would also end them at a lone "\r").
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            for n, line in enumerate(f, start=1):
                if n == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
                if not line.strip(_JSON_WHITESPACE):
                    continue
                try:
                    ex_id, prediction = _parse_line(line, n)
                except _BadLine as e:
                    problems.append(str(e))
                    continue
                if ex_id in found:
                    problems.append(f"line {n}: id {ex_id} already has a prediction on line {found[ex_id][1]}.")
                    continue
                found[ex_id] = (prediction, n)
                if ex_id not in known:
                    unknown.append((ex_id, n))
    except OSError as e:
        raise DataError(f"{path} cannot be read: {e.strerror}. Check the path of the predictions file.") from None
    if problems:
        shown = problems[:MAX_REPORTED_LINES]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DataError(
            f"{path} has {len(problems)} unusable line(s):\n  " + "\n  ".join(shown) + more +
            '\nWrite one JSON object per line, {"id": "<example id>", "prediction": "<summary text>"}, saved as '
            'UTF-8; an empty string is a valid prediction.'
        )
    if unknown:
        first = unknown[:MAX_REPORTED_IDS]
        raise DataError(
            f"{path} has predictions for {len(unknown)} ids that are not evaluation examples "
            f"(first: {', '.join(i for i, _ in first)}). They are on line(s) {', '.join(str(n) for _, n in first)}. "
            "Check data.source, data.eval_split and eval.max_examples against the file."
        )
    absent = [e.id for e in examples if e.id not in found]
    if absent and missing == "error":
        raise DataError(
            f"{path} has no prediction for {len(absent)} of {len(examples)} evaluation examples "
            f"(first: {', '.join(absent[:MAX_REPORTED_IDS])}). Predict every id of data.eval_split (an empty "
            "string for no output), set eval.missing_predictions=empty to score them as empty, or lower "
            "eval.max_examples."
        )
    return [found[e.id][0] if e.id in found else "" for e in examples]


def _parse_line(line: str, n: int) -> tuple[str, str]:
    """(id, prediction) from one non-blank line; raises _BadLine."""
    bad_byte = _UNDECODABLE.search(line)
    if bad_byte:
        raise _BadLine(f"line {n} is not UTF-8 text (byte 0x{ord(bad_byte.group()) - 0xDC00:02x} at character "
                       f"{bad_byte.start() + 1}).")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadLine(f"line {n} is not valid JSON ({e.msg} at character {e.colno}).") from None
    if not isinstance(row, dict):
        raise _BadLine(f"line {n} is {_JSON_TYPES.get(type(row), 'a value')}, not a JSON object.")
    for field in ("id", "prediction"):
        if field not in row:
            raise _BadLine(f'line {n}: no "{field}" field (fields: {", ".join(row) or "none"}).')
    ex_id, prediction = row["id"], row["prediction"]
    if isinstance(ex_id, bool) or not isinstance(ex_id, (str, int)):
        raise _BadLine(f'line {n}: "id" is {json.dumps(ex_id)[:40]}, not a string or an integer.')
    if not isinstance(prediction, str):
        raise _BadLine(f'line {n}: "prediction" is {json.dumps(prediction)[:40]}, not a string.')
    return str(ex_id), prediction
