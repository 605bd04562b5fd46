"""From ``DataConfig.source`` to a list of records: builtin sources, local files, hub datasets."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .builtin import BUILTIN_SOURCES, load_builtin
from .errors import DataError
from .files import FILE_SUFFIXES, Reading, read_file
from .hub import load_hub
from .records import Record


def _looks_like_path(source: str) -> bool:
    """A missing local file should say so, not fall through to a hub lookup of the same name."""
    return source.lower().endswith(FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~"))


def load_records(cfg: DataConfig) -> list[Record]:
    """The records of ``cfg.source``, at most ``cfg.max_documents`` of them, in a fixed order."""
    source = cfg.source.strip()
    if source.startswith("builtin:"):
        records = load_builtin(source)[: cfg.max_documents]
    elif source.startswith("hf:"):
        records = load_hub(source.removeprefix("hf:"), cfg.hf_split, Reading.of(cfg))
    elif Path(source).expanduser().is_dir():  # a local dataset directory: datasets reads its files
        records = load_hub(str(Path(source).expanduser()), cfg.hf_split, Reading.of(cfg))
    elif Path(source).expanduser().is_file() or _looks_like_path(source):
        records = read_file(Path(source).expanduser(), Reading.of(cfg))
    else:  # a hub id without the hf: prefix
        records = load_hub(source, cfg.hf_split, Reading.of(cfg))
    if not records:
        raise DataError(
            f"data source {cfg.source!r} has no records; a source is one of {', '.join(BUILTIN_SOURCES)}, "
            f"a local {'/'.join(FILE_SUFFIXES)} file, or hf:NAME"
        )
    return records
