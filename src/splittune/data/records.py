"""Records: the plain dicts every source yields, in one of four shapes.

``{"text"}`` raw text (optionally ``"title"``), ``{"text", "label"}`` a labelled text,
``{"prompt", "response"}`` an instruction pair, ``{"messages": [{"role", "content"}, ...]}`` a chat
whose last turn is the assistant's. Sources normalise whatever they read into these shapes, so the
tasks never see file formats or user field names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

RecordKind = Literal["text", "labelled", "pair", "chat"]
Record = dict[str, Any]


def allowed_fields(text_field: str = "text") -> str:
    """The field combinations a record may have, for error messages."""
    return (
        f"'{text_field}' (raw text, optionally with 'label'), 'prompt' and 'response', "
        "or 'messages' (a list of {role, content} ending with the assistant's turn)"
    )


def record_kind(record: Record) -> RecordKind:
    if "messages" in record:
        return "chat"
    if "prompt" in record:
        return "pair"
    if "label" in record:
        return "labelled"
    return "text"


def _string(raw: Mapping[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def _label(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"field 'label' must be a string or an integer, got {type(value).__name__}")
    label = str(value).strip()
    if not label:
        raise ValueError("field 'label' is empty")
    return label


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError("field 'messages' must be a non-empty list of {role, content}")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"the last message must be the assistant's (the turn trained on), got role {messages[-1]['role']!r}"
        )
    if len(messages) < 2:
        raise ValueError("messages needs at least one turn before the assistant's")
    if not messages[-1]["content"].strip():
        raise ValueError("the assistant's last message is empty")
    return messages


def normalize_record(raw: Any, text_field: str = "text", label_names: list[str] | None = None) -> Record:
    """One raw row (JSON object, CSV row, hub row) → a record; ``ValueError`` says what is wrong.

    Precedence when a row has several: messages, then prompt/response, then text (+ label).
    ``label_names`` maps integer labels to names (a hub dataset's ClassLabel).
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected an object with {allowed_fields(text_field)}, got {type(raw).__name__}")
    if "messages" in raw:
        return {"messages": _messages(raw["messages"])}
    if "prompt" in raw or "response" in raw:
        missing = [k for k in ("prompt", "response") if k not in raw]
        if missing:
            raise ValueError(f"has {'response' if missing == ['prompt'] else 'prompt'} but no {missing[0]!r}")
        return {"prompt": _string(raw, "prompt"), "response": _string(raw, "response")}
    if text_field in raw:
        record: Record = {"text": _string(raw, text_field)}
        if raw.get("label") is not None:
            label = raw["label"]
            if label_names is not None and isinstance(label, int) and 0 <= label < len(label_names):
                label = label_names[label]
            record["label"] = _label(label)
        return record
    found = ", ".join(repr(k) for k in raw) or "none"
    raise ValueError(f"no usable fields (found {found}); expected {allowed_fields(text_field)}; name yours with data.fields "
                     "(e.g. {prompt: question, response: answer}) or the layout with data.format")
