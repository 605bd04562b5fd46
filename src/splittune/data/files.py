"""Local files: ``.txt`` (raw text), ``.jsonl`` and ``.csv`` (text, labelled, prompt/response or chat rows).

A ``.txt`` file is cut into documents at blank lines, with paragraphs grouped greedily until a document
reaches about 2,000 characters. A single paragraph is often one line of dialogue, and an end-of-text
token after each would teach the model to stop mid-scene. A whole file as one document is too coarse
to hold some of it out for evaluation. Files with less text get smaller documents, so even a short file
yields about 20 documents. Every error names the file and the line.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from .builtin import strip_gutenberg
from .errors import DataError
from .records import Record, allowed_fields, normalize_record, record_kind

FILE_SUFFIXES = (".txt", ".jsonl", ".csv")
TXT_DOCUMENT_CHARS = 2000
TXT_MIN_DOCUMENTS = 20

_BLANK_LINES = re.compile(r"\n\s*\n")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 ({err.reason}); save the file as UTF-8") from None


def read_txt(path: Path, max_documents: int | None = None) -> list[Record]:
    text = strip_gutenberg(_read_text(path))
    paragraphs = [p.rstrip() for p in _BLANK_LINES.split(text) if p.strip()]  # keeps a first line's indent
    target = min(TXT_DOCUMENT_CHARS, max(1, sum(map(len, paragraphs)) // TXT_MIN_DOCUMENTS))
    documents: list[Record] = []
    group: list[str] = []
    size = 0
    for paragraph in paragraphs:
        group.append(paragraph)
        size += len(paragraph)
        if size >= target:
            documents.append({"text": "\n\n".join(group)})
            group, size = [], 0
            if max_documents is not None and len(documents) >= max_documents:
                return documents
    if group:
        documents.append({"text": "\n\n".join(group)})
    return documents


def _check_consistent(path: Path, line: int, record: Record, first: Record | None) -> None:
    """Raw text and instruction rows cannot share a file: one file is one task."""
    if first is not None and (record_kind(record) == "text") != (record_kind(first) == "text"):
        kinds = {True: "raw text", False: "an instruction/labelled row"}
        raise DataError(
            f"{path}: line {line} is {kinds[record_kind(record) == 'text']} but the first row is "
            f"{kinds[record_kind(first) == 'text']}; one file holds one kind of row"
        )


def _add_record(path: Path, line: int, raw: object, text_field: str, records: list[Record], max_documents: int | None) -> bool:
    """Normalize one raw row, check it matches the file's first record, append it; True once the cap is reached."""
    try:
        record = normalize_record(raw, text_field)
    except ValueError as err:
        raise DataError(f"{path}: line {line}: {err}") from None
    _check_consistent(path, line, record, records[0] if records else None)
    records.append(record)
    return max_documents is not None and len(records) >= max_documents


def read_jsonl(path: Path, text_field: str = "text", max_documents: int | None = None) -> list[Record]:
    records: list[Record] = []
    with open(path, encoding="utf-8-sig") as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}: line {line_no} is not valid JSON ({err.msg} at column {err.colno})"
                    ) from None
                if _add_record(path, line_no, raw, text_field, records, max_documents):
                    break
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: line {line_no + 1} is not valid UTF-8 ({err.reason}); save the file as UTF-8"
            ) from None
    return records


def read_csv(path: Path, text_field: str = "text", max_documents: int | None = None) -> list[Record]:
    records: list[Record] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        usable = {text_field, "prompt", "response"}
        if not usable & set(columns):
            raise DataError(
                f"{path}: line 1: the header has columns {columns}; expected {allowed_fields(text_field)} "
                "(chat messages need .jsonl)"
            )
        try:
            for row in reader:
                line = reader.line_num  # the row's last physical line (quoted cells may span lines)
                if None in row:
                    raise DataError(f"{path}: line {line} has more cells than the header's {len(columns)} columns")
                if _add_record(path, line, {k: v for k, v in row.items() if v is not None}, text_field, records, max_documents):
                    break
        except csv.Error as err:
            raise DataError(f"{path}: line {reader.line_num}: {err}") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: near line {reader.line_num + 1}: not valid UTF-8 ({err.reason})") from None
    return records


def read_file(path: Path, text_field: str = "text", max_documents: int | None = None) -> list[Record]:
    """Records of one local file, chosen by its suffix."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_txt(path, max_documents)
    if suffix == ".jsonl":
        return read_jsonl(path, text_field, max_documents)
    if suffix == ".csv":
        return read_csv(path, text_field, max_documents)
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; supported: {', '.join(FILE_SUFFIXES)}")
