"""Reading a config: YAML files, ``--set key=value`` overrides, validation errors as one readable message, and the
config dumped back (what a run directory records and a resume compares)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from .base import ConfigError
from .run import RunConfig



def _parse_value(text: str) -> Any:
    """Parse a ``--set`` value with YAML rules (numbers, lists, null, booleans; anything else is a string)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text

def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` assignment to a nested dict, checking the key exists."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
    path, _, raw = assignment.partition("=")
    keys = path.strip().split(".")
    model: type[BaseModel] = RunConfig
    node = tree
    for depth, key in enumerate(keys):
        fields = model.model_fields
        if key not in fields:
            where = ".".join(keys[:depth]) or "the top level"
            raise ConfigError(f"unknown config key {path!r}{did_you_mean(keys[:depth + 1])}: {key!r} is not one of "
                              f"{', '.join(public_fields(model))} (at {where})")
        annotation = fields[key].annotation
        section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if depth == len(keys) - 1:
            value = _parse_value(raw)
            shorthand = getattr(section, "shorthand", None)
            if shorthand is not None and isinstance(value, str):  # --set data=my.jsonl is data.source=my.jsonl
                _subtree(node, key, shorthand)[shorthand] = value
            else:
                node[key] = value
            return
        if section is None:
            raise ConfigError(f"config key {'.'.join(keys[: depth + 1])!r} is a value, not a section; cannot set {path!r}")
        node = _subtree(node, key, getattr(section, "shorthand", None))
        model = section

def _subtree(node: dict[str, Any], key: str, shorthand: str | None) -> dict[str, Any]:
    """The mapping under ``key`` (a section written as its shorthand string becomes ``{shorthand: string}``)."""
    value = node.get(key)
    if isinstance(value, str) and shorthand is not None:
        value = {shorthand: value}
    if not isinstance(value, dict):
        value = {}
    node[key] = value
    return value

def key_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config (sections walked, values listed), for suggestions."""
    out = []
    for name in public_fields(model):
        annotation = model.model_fields[name].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += key_paths(annotation, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def did_you_mean(keys: list[str]) -> str:
    """`` (did you mean 'train.steps'?)`` for a key that is a known key's last part, or close to a known key; ``""``."""
    wrong, paths = ".".join(keys), key_paths()
    if len(keys) > 1:  # inside a section: its own keys only (``lora.rank`` is no answer to ``client_overrides.1.rank``)
        paths = [p for p in paths if p.startswith(f"{keys[0]}.")]
    same_end = [p for p in paths if p.rsplit(".", 1)[-1] == keys[-1] and p != wrong]
    close = same_end or difflib.get_close_matches(wrong, paths, n=1, cutoff=0.8)
    return f" (did you mean {' or '.join(repr(p) for p in close[:2])}?)" if close else ""


def public_fields(model: type[BaseModel]) -> list[str]:
    """The keys a section offers (deprecated spellings still accepted are left out)."""
    return [name for name, field in model.model_fields.items() if not field.exclude]

def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The config section a location points into (through lists and maps of sections), for naming its keys."""
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue  # a list index or map key stays in the same section
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _inner_section(field.annotation)
    return model

def _inner_section(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # Optional, unions, list[...] and dict[..., ...]
        found = _inner_section(arg)
        if found is not None:
            return found
    return None

def _format_errors(err: ValidationError) -> str:
    errors = err.errors()
    # a union (e.g. a list or a map of overrides) reports every member's errors, tagged like 'list[...]':
    # keep the member the input was written as, and drop the tags from the key
    tagged = [e for e in errors if any(isinstance(p, str) and "[" in p for p in e["loc"])]
    if tagged:
        mismatched = {e["loc"] for e in tagged if e["type"] in ("list_type", "dict_type")}
        errors = [e for e in errors if e["loc"] not in mismatched] or errors
    lines = []
    for e in errors:
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        key = ".".join(str(p) for p in loc) or "config"
        if e["type"] == "extra_forbidden":
            section = _section_at(loc[:-1])
            allowed = f": {str(loc[-1])!r} is not one of {', '.join(public_fields(section))}" if section else ""
            lines.append(f"unknown config key {key!r}{did_you_mean([str(p) for p in loc if not isinstance(p, int)])}{allowed}")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}" if loc else msg)
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(dict.fromkeys(lines))

def _read_yaml(path: Path) -> Any:
    """A YAML file's content, or a ConfigError naming the file (and the line and column of a syntax error)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line}; save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the builtin default), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate(tree)

def validate(tree: dict[str, Any]) -> RunConfig:
    """A config from a plain mapping, or a ConfigError naming every bad key."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None

def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
