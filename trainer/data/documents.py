"""Unlabeled documents (an id and a text per row) from a .jsonl, .csv or .parquet file.

What `lastmile predict` summarizes. Ids are kept as the file spells them (a CSV id `007` stays
`007`; integer ids become their decimal text), because predictions are matched to documents by id.
Every unusable row is reported at once, by line (JSONL) or row number, as a `DataError`.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from lastmile.data.records import Example, read_jsonl_rows, text_problem
from lastmile.errors import DataError

SUFFIXES = (".jsonl", ".csv", ".parquet")
MAX_REPORTED = 20


def read_documents(path: Path, id_field: str, document_field: str) -> list[Example]:
    """The documents of `path` in file order (no summaries: unlabeled), or a DataError listing every
    unusable row: a missing or empty id or document, an id that is not text or an integer, a duplicate id."""
    rows = _rows(path)
    if not rows:
        raise DataError(f"predict.input ({path}) holds no documents. There is nothing to summarize. Check the file.")
    columns = sorted({k for r in rows for k in r if k != "__line__"})
    absent = [f"{name} ({value}) is not a column of {path} (columns: {', '.join(columns) or 'none'}). {why}. Set "
              f"{name}=<column>, or rename the column."
              for name, value, why in (("predict.id_field", id_field, "Ids match predictions to documents"),
                                       ("predict.document_field", document_field, "It holds the text to summarize"))
              if not any(value in r for r in rows)]
    if absent:
        raise DataError("\n".join(absent))
    docs, problems, where_id = [], [], defaultdict(list)
    for i, row in enumerate(rows):
        label = f"line {row['__line__']}" if "__line__" in row else f"row {i + 1}"
        raw_id = row.get(id_field)
        bad = [x for x in (_id_problem(raw_id, id_field), text_problem(row, document_field)) if x]
        if bad:
            problems.append(f"{label}: " + "; ".join(bad))
            continue
        where_id[str(raw_id)].append(label)
        docs.append(Example(str(raw_id), row[document_field].strip(), summary="", references=()))
    problems += [f"duplicate id {i!r} ({', '.join(labels)})" for i, labels in where_id.items() if len(labels) > 1]
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"predict.input ({path}) has {len(problems)} problem(s):\n  " + "\n  ".join(
            problems[:MAX_REPORTED]) + more + "\nEvery document needs its own non-empty id (predictions are matched "
            "to documents by it) and a non-empty text. Fix the rows, or name other columns with predict.id_field / "
            f"predict.document_field (now {id_field!r} / {document_field!r}).")
    return docs


def _id_problem(value, name: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"id field {name!r} is empty"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"id field {name!r} is {json.dumps(value, default=str)[:40]}, not text or an integer"
    return None


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return read_jsonl_rows(path)
    try:
        if path.suffix == ".csv":
            # The csv module, not `datasets` (which types columns): an id `007` stays `007`.
            csv.field_size_limit(2**31 - 1)  # a whole paper in one cell passes the default 128 KiB
            with path.open(newline="", encoding="utf-8-sig") as f:
                return [{k: v for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except (OSError, ValueError, csv.Error) as e:  # UnicodeDecodeError and pyarrow's ArrowInvalid are ValueErrors
        raise DataError(f"predict.input ({path}) could not be read as {path.suffix[1:]}: {str(e)[:300]}. Save it as "
                        f"UTF-8 {path.suffix[1:]} with a header of column names.") from None
