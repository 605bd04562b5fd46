"""Sources ``datasets`` reads for us: Parquet and Arrow files, ``save_to_disk`` folders, folders of data files, and
hub datasets (``hf:NAME``, ``hf:NAME/path/in/repo.parquet``).

``datasets`` is an optional dependency (``splittune[datasets]``), imported only here and only when such a source is
used. Its rows go through the same reshaping and checks as our own readers' (``files.Rows``), named by row number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DataError
from .files import Reading, Rows
from .records import Record

_INSTALL_HINT = "pip install 'splittune[datasets]'"
# datasets' packaged builder for each data-file suffix (for files inside a hub repository)
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
_DISK_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes for a DatasetDict / a Dataset


def _datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} is read by the datasets package, which is not installed: {_INSTALL_HINT}") from None
    datasets.disable_progress_bars()  # our own progress lines say what is loading
    return datasets


def _label_names(dataset: Any) -> list[str] | None:
    """Names of a ClassLabel ``label`` column, so integer labels become words the model can score."""
    feature = (getattr(dataset, "features", None) or {}).get("label")
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _is_unreachable(err: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a network failure rather than a bad name."""
    for _ in range(10):  # the chain of causes is short; the bound guards against cycles
        if err is None:
            return False
        text = f"{type(err).__name__} {err}".lower()
        if isinstance(err, (ConnectionError, TimeoutError)) or any(
            s in text for s in ("offline", "connect", "resolve", "timed out", "timeout", "network", "unreachable")
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def _records(dataset: Any, where: str, reading: Reading) -> list[Record]:
    rows = Rows(where, reading, unit="row", label_names=_label_names(dataset))
    for i, row in enumerate(dataset):
        rows.add(i, row)
        if rows.full:
            break
    return rows.done()


def _load(where: str, split: str, **load_args: Any) -> Any:
    """``datasets.load_dataset`` with its many error types turned into one ``DataError`` that says what to do."""
    datasets = _datasets(f"data source {where!r}")
    try:
        return datasets.load_dataset(split=split, **load_args)
    except Exception as err:  # datasets raises many types; keep its message, add what to do
        if _is_unreachable(err):
            raise DataError(
                f"could not load dataset {where!r}: the Hugging Face Hub is unreachable ({type(err).__name__}: {err}); "
                "use a local file or dataset folder, or a builtin: source"
            ) from err
        raise DataError(f"could not load dataset {where!r} (split {split!r}): {type(err).__name__}: {err}") from err


def is_saved_dataset(path: Path) -> bool:
    """Whether a folder was written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / marker).is_file() for marker in _DISK_MARKERS)


def load_saved(path: Path, split: str = "train", reading: Reading = Reading()) -> list[Record]:
    """A ``save_to_disk`` folder: a Dataset as it is, a DatasetDict's ``split`` (``data.hf_split``)."""
    datasets = _datasets(f"dataset folder {str(path)!r}")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataError(f"dataset folder {str(path)!r} has splits {', '.join(splits)}; data.hf_split is {split!r}")
        dataset = datasets.load_from_disk(str(path / split))
    else:
        dataset = datasets.load_from_disk(str(path))
    return _records(dataset, str(path), reading)


def load_table(path: Path, reading: Reading = Reading()) -> list[Record]:
    """One Parquet or Arrow file (Arrow's stream format, as ``save_to_disk`` writes, or its file format)."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    builder = _BUILDERS[path.suffix.lower()]
    return _records(_load(str(path), "train", path=builder, data_files=str(path)), str(path), reading)


def load_hub(name: str, split: str = "train", reading: Reading = Reading()) -> list[Record]:
    """A hub dataset by id, a folder of data files, or one data file inside a hub repository
    (``NAME/path/file.parquet``, read from ``hf://datasets/NAME/path/file.parquet``)."""
    suffix = Path(name).suffix.lower()
    if suffix in _BUILDERS and name.count("/") >= 2 and not Path(name).expanduser().exists():
        # data_files always load as one split named "train"
        dataset = _load(name, "train", path=_BUILDERS[suffix], data_files=f"hf://datasets/{name}")
    else:
        dataset = _load(name, split, path=name)
    return _records(dataset, name, reading)
