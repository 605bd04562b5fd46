"""From ``DataConfig.source`` to a list of records: builtin sources, local files and folders, hub datasets."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .builtin import BUILTIN_SOURCES, load_builtin
from .errors import DataError
from .files import FILE_SUFFIXES, TABLE_SUFFIXES, Reading, read_file
from .hub import is_saved_dataset, load_hub, load_saved, load_table
from .records import Record

ALL_SUFFIXES = FILE_SUFFIXES + TABLE_SUFFIXES


def _looks_like_path(source: str) -> bool:
    """A missing local file should say so, not fall through to a hub lookup of the same name."""
    return source.lower().endswith(ALL_SUFFIXES) or source.startswith(("/", "./", "../", "~"))


def _local(path: Path, cfg: DataConfig, reading: Reading) -> list[Record]:
    if is_saved_dataset(path):
        return load_saved(path, cfg.hf_split, reading)
    if path.is_dir():  # a folder of data files: datasets reads them as one dataset
        return load_hub(str(path), cfg.hf_split, reading)
    if path.suffix.lower() in TABLE_SUFFIXES:
        return load_table(path, reading)
    return read_file(path, reading)


def load_records(cfg: DataConfig) -> list[Record]:
    """The records of ``cfg.source``, at most ``cfg.max_documents`` of them, in a fixed order."""
    source, reading = cfg.source.strip(), Reading.of(cfg)
    if source.startswith("builtin:"):
        return load_builtin(source)[: cfg.max_documents] or _none(cfg)
    target = source.removeprefix("hf:")
    path = Path(target).expanduser()
    if path.exists() or (not source.startswith("hf:") and _looks_like_path(source)):
        records = _local(path, cfg, reading)  # hf:./x.parquet is a local file too
    else:  # a hub id (with or without hf:), or a file inside a hub repository
        records = load_hub(target, cfg.hf_split, reading)
    return records or _none(cfg)


def _none(cfg: DataConfig) -> list[Record]:
    raise DataError(
        f"data source {cfg.source!r} has no records; a source is one of {', '.join(BUILTIN_SOURCES)}, a local "
        f"{'/'.join(ALL_SUFFIXES)} file, a dataset folder (save_to_disk or data files), or hf:NAME"
    )
