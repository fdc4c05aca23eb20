"""User task files: JSON Lines, plain text and CSV, read into `TextSample`s.

Ids come from positions in the file (line, paragraph, row; counted from 1, as editors
do) or from an explicit `id` field, so appending to a file keeps every existing id.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from ..config import TaskConfig
from ..errors import TaskError
from .samples import TextSample

#: File suffix -> format, for `format: auto`.
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".md": "text", ".csv": "csv"}
_CHARS_PER_TOKEN = 4  # rough upper bound; pieces stay a little longer than max_length tokens


def file_format(task: TaskConfig, path: Path) -> str:
    """The format of `path`: `task.format`, or from its suffix when that is "auto"."""
    if task.format != "auto":
        return task.format
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        suffixes = ", ".join(f"{s} ({f})" for s, f in SUFFIX_FORMATS.items())
        raise TaskError(
            f"task '{task.name}': cannot tell the format of {path} from its suffix "
            f"{path.suffix or '(none)'!r}; known suffixes: {suffixes}. Rename the file or set "
            f"tasks.{task.name}.format to jsonl, text or csv"
        )
    return fmt


def read_task_file(task: TaskConfig, path: Path) -> list[TextSample]:
    """All samples of the task file `path`, in file order."""
    fmt = file_format(task, path)
    try:
        content = path.read_text(encoding="utf-8-sig")  # -sig: drop a BOM left by Excel & co.
    except UnicodeDecodeError as err:
        raise TaskError(
            f"task '{task.name}': {path} is not UTF-8 text ({err}); re-save it as UTF-8"
        ) from None
    if not content.strip():
        raise TaskError(
            f"task '{task.name}': task file {path} is empty; add samples or point "
            f"tasks.{task.name}.source elsewhere"
        )
    readers = {"jsonl": _read_jsonl, "text": _read_text, "csv": _read_csv}
    return readers[fmt](task, path, content)


def _read_jsonl(task: TaskConfig, path: Path, content: str) -> list[TextSample]:
    """One object a line: `text`, or `prompt` + `completion`; optional unique `id`."""
    samples, id_lines = [], {}
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028, which splitlines cuts on.
    for line_no, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"task '{task.name}': {path} line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(
                f"{where} is not valid JSON ({err.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise TaskError(
                f"{where} is a JSON {type(record).__name__}, not an object like {{\"text\": ...}}"
            )
        sample_id = record.get("id", f"{path.stem}:{line_no}")
        if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
            raise TaskError(f"{where}: 'id' must be a string or integer, got {sample_id!r}")
        sample_id = str(sample_id)
        if sample_id in id_lines:
            raise TaskError(
                f"{where}: duplicate id {sample_id!r} (also on line {id_lines[sample_id]}); ids must be unique"
            )
        id_lines[sample_id] = line_no
        samples.append(_sample_from_record(record, sample_id, where))
    return samples


def _sample_from_record(record: dict, sample_id: str, where: str) -> TextSample:
    """A `TextSample` from a JSON object with `text` or `prompt` + `completion`."""
    fields = {key: record.get(key) for key in ("text", "prompt", "completion")}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise TaskError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    has_text = fields["text"] is not None
    has_pair = fields["prompt"] is not None or fields["completion"] is not None
    if has_text and not has_pair:
        return TextSample(id=sample_id, text=fields["text"])
    if not has_text and fields["prompt"] is not None and fields["completion"] is not None:
        return TextSample(id=sample_id, prompt=fields["prompt"], completion=fields["completion"])
    raise TaskError(
        f"{where} has keys {sorted(record)}; it needs either 'text', or both 'prompt' and "
        "'completion' (not both kinds)"
    )


def _read_text(task: TaskConfig, path: Path, content: str) -> list[TextSample]:
    """Paragraphs split on blank lines; long ones cut into pieces of about max_length tokens."""
    max_chars = _CHARS_PER_TOKEN * task.max_length
    samples = []
    paragraphs = re.split(r"\n[ \t]*\n", content.replace("\r\n", "\n"))
    for paragraph_no, paragraph in enumerate((p.strip() for p in paragraphs if p.strip()), start=1):
        for piece_no, piece in enumerate(_pieces(paragraph, max_chars), start=1):
            samples.append(TextSample(id=f"{path.stem}:{paragraph_no}:{piece_no}", text=piece))
    return samples


def _pieces(text: str, max_chars: int) -> list[str]:
    """`text` cut into pieces of at most `max_chars`, at whitespace where possible."""
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind(" ", max_chars // 2, max_chars + 1)
        cut = cut if cut > 0 else max_chars  # no space in reach (a long URL, CJK): cut hard
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return pieces + [text] if text else pieces


def _read_csv(task: TaskConfig, path: Path, content: str) -> list[TextSample]:
    """Rows of a CSV with a header; text from column `task.column`, ids from `id` if present."""
    reader = csv.DictReader(io.StringIO(content, newline=""))
    columns = reader.fieldnames or []
    if task.column not in columns:
        raise TaskError(
            f"task '{task.name}': {path} has no column {task.column!r}; available columns: "
            f"{', '.join(repr(c) for c in columns)}. Set tasks.{task.name}.column to one of them"
        )
    samples, id_rows = [], {}
    try:
        for row_no, row in enumerate(reader, start=1):
            sample_id = (row.get("id") or "").strip() if "id" in columns else f"{path.stem}:{row_no}"
            if not sample_id:
                raise TaskError(f"task '{task.name}': {path} row {row_no} has an empty 'id'")
            if sample_id in id_rows:
                raise TaskError(
                    f"task '{task.name}': {path} row {row_no}: duplicate id {sample_id!r} "
                    f"(also in row {id_rows[sample_id]}); ids must be unique"
                )
            id_rows[sample_id] = row_no
            samples.append(TextSample(id=sample_id, text=row.get(task.column) or ""))
    except csv.Error as err:
        raise TaskError(
            f"task '{task.name}': {path} is not valid CSV near line {reader.line_num}: {err}"
        ) from None
    if not samples:
        raise TaskError(f"task '{task.name}': task file {path} is empty (a header but no rows)")
    return samples
