"""What every part of the config shares: its errors and warnings, and ``Section``, the base of every section (unknown
keys refused; a section given as a plain string means its shorthand key)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from ..errors import SplittuneError


class ConfigError(SplittuneError, ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""

class SplittuneWarning(UserWarning):
    """A setting that runs but probably not as meant (the CLI prints it as one ``warning:`` line)."""

class SplittuneDeprecationWarning(SplittuneWarning, FutureWarning):
    """A spelling that still works but will go; the message says what to write instead."""

def warn(message: str, category: type[Warning] = SplittuneWarning) -> None:
    warnings.warn(message, category, stacklevel=3)

class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # a section written as a plain string means this one of its keys (``data: my.jsonl`` is ``data.source``)
    shorthand: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if cls.shorthand is not None and isinstance(value, str):
            return {cls.shorthand: value}
        return value
