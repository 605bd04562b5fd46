"""Hugging Face datasets (``hf:NAME``, a hub id or a local dataset directory), through ``datasets``.

``datasets`` is an optional dependency, imported only here and only when such a source is used.
"""

from __future__ import annotations

import itertools
from typing import Any

from .errors import DataError
from .files import Reading
from .records import Record, normalize_record
from .shapes import reshape

_INSTALL_HINT = "pip install 'splittune[datasets]'"


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


def load_hub(name: str, split: str = "train", reading: Reading = Reading()) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data source {name!r} is a Hugging Face dataset and needs the datasets package: {_INSTALL_HINT}"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; keep its message, add what to do
        if _is_unreachable(err):
            raise DataError(
                f"could not load dataset {name!r}: the Hugging Face Hub is unreachable ({type(err).__name__}: {err}); "
                "use a local .txt/.jsonl/.csv file, a local dataset directory, or a builtin: source"
            ) from err
        raise DataError(f"could not load dataset {name!r} (split {split!r}): {type(err).__name__}: {err}") from err
    label_names = _label_names(dataset)
    rows = dataset if reading.max_documents is None else itertools.islice(dataset, reading.max_documents)
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(normalize_record(reshape(row, reading.format, reading.fields, reading.text_field),
                                            reading.text_field, label_names))
        except ValueError as err:
            raise DataError(f"dataset {name!r} row {i}: {err}") from None
    return records
