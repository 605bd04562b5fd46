"""Local files: ``.txt`` (raw text), ``.json`` (an array of rows), ``.jsonl`` and ``.csv`` (rows of any layout
``shapes.py`` knows: text, labelled, prompt/response, Alpaca, ShareGPT, chat messages).

A ``.txt`` file is cut into paragraphs (``data.document_split``: at blank lines by default, at every line, or not
at all), and paragraphs are grouped greedily until a document reaches about 2,000 characters. A single paragraph
is often one line of dialogue, and an end-of-text token after each would teach the model to stop mid-scene. A
whole file as one document is too coarse to hold some of it out for evaluation. Files with less text get smaller
documents, so even a short file yields about 20 documents.

Every file is decoded whole first (``data.encoding``), so an error names the line the bad bytes are on; every
row's error names the file and the line; ``data.skip_bad_lines`` skips such rows and counts them instead.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import warn
from .builtin import strip_gutenberg
from .errors import DataError
from .records import Record, allowed_fields, normalize_record, record_kind
from .shapes import reshape

FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv")
TABLE_SUFFIXES = (".parquet", ".arrow")  # read through datasets (hub.py)
TXT_DOCUMENT_CHARS = 2000
TXT_MIN_DOCUMENTS = 20
CSV_CELL_LIMIT = 1 << 30  # csv's own default (131,072 characters) refuses a long document in one cell

_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass
class Reading:
    """How to read a source's rows (the ``data`` section's reading keys)."""

    text_field: str = "text"
    format: str = "auto"
    fields: Mapping[str, str] = field(default_factory=dict)
    encoding: str = "utf-8"
    document_split: str = "blank"
    skip_bad_lines: bool = False
    max_documents: int | None = None

    @classmethod
    def of(cls, cfg: Any) -> "Reading":
        return cls(cfg.text_field, cfg.format, dict(cfg.fields or {}), cfg.encoding, cfg.document_split, cfg.skip_bad_lines,
                   cfg.max_documents)


def decode(path: Path, encoding: str = "utf-8") -> str:
    """The whole file as text; bad bytes are reported on the line they are on."""
    raw = path.read_bytes()
    utf8 = encoding.lower().replace("_", "-") in ("utf-8", "utf8")
    codec = "utf-8-sig" if utf8 else encoding  # tolerate a byte-order mark
    try:
        return raw.decode(codec)
    except LookupError:
        raise DataError(f"data.encoding {encoding!r} is not an encoding Python knows (e.g. utf-8, cp1252, latin-1)") from None
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid {'UTF-8' if utf8 else encoding} (byte 0x{raw[err.start]:02x}: {err.reason}); "
                        "save the file as UTF-8, or set data.encoding to the one it was written in (e.g. cp1252)") from None


def read_txt(path: Path, reading: Reading = Reading()) -> list[Record]:
    text = strip_gutenberg(decode(path, reading.encoding)).replace("\r\n", "\n")
    if reading.document_split == "file":
        return [{"text": text.strip("\n")}] if text.strip() else []
    pieces = text.split("\n") if reading.document_split == "line" else _BLANK_LINES.split(text)
    paragraphs = [p.rstrip() for p in pieces if p.strip()]  # keeps a first line's indent
    target = min(TXT_DOCUMENT_CHARS, max(1, sum(map(len, paragraphs)) // TXT_MIN_DOCUMENTS))
    joint = "\n" if reading.document_split == "line" else "\n\n"
    documents: list[Record] = []
    group: list[str] = []
    size = 0
    for paragraph in paragraphs:
        group.append(paragraph)
        size += len(paragraph)
        if size >= target:
            documents.append({"text": joint.join(group)})
            group, size = [], 0
            if reading.max_documents is not None and len(documents) >= reading.max_documents:
                return documents
    if group:
        documents.append({"text": joint.join(group)})
    if len(documents) == 1 and reading.document_split == "blank" and len(paragraphs) == 1 and text.count("\n") > 1:
        warn(f"{path} has no blank line, so it is one document; if each line is a document of its own, "
             "set data.document_split: line")
    return documents


class Rows:
    """The rows of one file on their way to records: reshaped, normalised, one kind per file; bad ones raised, or
    skipped and counted (``skip_bad_lines``)."""

    def __init__(self, path: Path | str, reading: Reading, unit: str = "line", label_names: list[str] | None = None):
        self.path, self.reading, self.unit, self.label_names = path, reading, unit, label_names
        self.records: list[Record] = []
        self.skipped: list[tuple[int, str]] = []  # (line, why)

    @property
    def full(self) -> bool:
        return self.reading.max_documents is not None and len(self.records) >= self.reading.max_documents

    def bad(self, line: int, why: str) -> None:
        """Row ``line`` cannot be read: ``why`` continues "line N" ("is not valid JSON…", ": field … is empty")."""
        if not self.reading.skip_bad_lines:
            raise DataError(f"{self.path}: {self.unit} {line}{why} (data.skip_bad_lines: true skips such rows and counts them)")
        self.skipped.append((line, why.removeprefix(": ").removeprefix(" ")))

    def add(self, line: int, raw: object) -> None:
        r = self.reading
        try:
            record = normalize_record(reshape(raw, r.format, r.fields, r.text_field), r.text_field, self.label_names)
        except ValueError as err:
            return self.bad(line, f": {err}")
        first = self.records[0] if self.records else None
        if first is not None and (record_kind(record) == "text") != (record_kind(first) == "text"):
            kinds = {True: "raw text", False: "an instruction/labelled row"}
            return self.bad(line, f" is {kinds[record_kind(record) == 'text']} but the first row is "
                                  f"{kinds[record_kind(first) == 'text']}; one file holds one kind of row")
        self.records.append(record)

    def done(self) -> list[Record]:
        if self.skipped:
            many = "s" * (len(self.skipped) > 1)
            lines = ", ".join(str(n) for n, _ in self.skipped[:5]) + (", …" if len(self.skipped) > 5 else "")
            warn(f"{self.path}: skipped {len(self.skipped)} bad row{many} ({self.unit}{many} {lines}); "
                 f"the first: {self.skipped[0][1]}")
        return self.records


def _json_error(err: json.JSONDecodeError) -> str:
    hint = " (a tab or line break inside a string must be written \\t or \\n)" if "control character" in err.msg else ""
    msg = err.msg.removesuffix(" at")  # json's "Invalid control character at": the column follows
    return f" is not valid JSON ({msg[0].lower()}{msg[1:]} at column {err.colno}){hint}"


def read_jsonl(path: Path, reading: Reading = Reading(), text: str | None = None) -> list[Record]:
    rows = Rows(path, reading)
    for line_no, line in enumerate((decode(path, reading.encoding) if text is None else text).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            rows.bad(line_no, _json_error(err))
            continue
        rows.add(line_no, raw)
        if rows.full:
            break
    return rows.done()


def read_json(path: Path, reading: Reading = Reading()) -> list[Record]:
    """A JSON array of rows (Alpaca's own files), or an object holding one (``{"data": [...]}``); a ``.json`` file
    that is JSON Lines is read as such."""
    text = decode(path, reading.encoding)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return read_jsonl(path, reading, text)  # JSON Lines under a .json name
        raise DataError(f"{path}: line {err.lineno}{_json_error(err)}") from None
    if isinstance(data, Mapping):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of rows (or an object holding one list of them), got an object "
                            f"with {'lists ' + ', '.join(map(repr, lists)) if lists else 'no list'}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    starts = _item_lines(text, len(data))
    rows = Rows(path, reading)
    for i, raw in enumerate(data):
        rows.add(starts[i] if i < len(starts) else i + 1, raw)
        if rows.full:
            break
    return rows.done()


def _item_lines(text: str, count: int) -> list[int]:
    """The line each top-level item of a JSON array starts on (a row's errors name it)."""
    decoder, lines, at = json.JSONDecoder(), [], text.index("[") + 1 if "[" in text else 0
    try:
        for _ in range(count):
            while text[at] in " \t\r\n,":
                at += 1
            lines.append(text.count("\n", 0, at) + 1)
            at = decoder.raw_decode(text, at)[1]
    except (ValueError, IndexError):
        pass
    return lines


def read_csv(path: Path, reading: Reading = Reading()) -> list[Record]:
    text = decode(path, reading.encoding)
    csv.field_size_limit(CSV_CELL_LIMIT)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = reader.fieldnames or []
    except csv.Error as err:
        raise DataError(f"{path}: line 1 (the header): {err}") from None
    known = {reading.text_field, "prompt", "response", "instruction", "output", "question", "answer", "query", "label",
             *(reading.fields or {}).values()}
    if not known & set(columns):
        raise DataError(f"{path}: line 1: the header has columns {columns}; expected {allowed_fields(reading.text_field)}, "
                        "or data.fields naming yours (chat messages need .jsonl or .json)")
    rows = Rows(path, reading)
    try:
        for row in reader:
            line = reader.line_num  # the row's last physical line (quoted cells may span lines)
            if None in row:
                rows.bad(line, f" has more cells than the header's {len(columns)} columns")
                continue
            rows.add(line, {k: v for k, v in row.items() if v is not None})
            if rows.full:
                break
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: {err}") from None
    return rows.done()


def read_file(path: Path, reading: Reading = Reading()) -> list[Record]:
    """Records of one local file, chosen by its suffix."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    readers = {".txt": read_txt, ".json": read_json, ".jsonl": read_jsonl, ".csv": read_csv}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; supported: {', '.join(FILE_SUFFIXES + TABLE_SUFFIXES)}, "
                        "or a dataset folder")
    return readers[suffix](path, reading)
