"""The shapes people's rows come in, onto the record shapes of ``records.py``: a row's own field names (``data.fields``)
and the common dataset layouts, detected or named (``data.format``).

- ``messages`` (OpenAI): ``{"messages": [{"role", "content"}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``
- ``alpaca``: ``{"instruction", "input"?, "output"}`` (the input, when there is one, follows the instruction after a
  blank line, as Alpaca's own prompt puts it)
- ``pairs``: ``{"prompt", "response"}``, also ``question``/``answer`` and ``query``/``response``
- ``text``: ``{"text"}`` (``data.text_field``), optionally ``label``

A pair or Alpaca row with a ``system`` field becomes a chat whose first turn is that system message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FORMATS = ("auto", "text", "pairs", "messages", "alpaca", "sharegpt")
FIELDS = ("text", "label", "prompt", "response", "system", "messages")  # what ``data.fields`` may map

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
PAIR_NAMES = (("prompt", "response"), ("question", "answer"), ("query", "response"), ("instruction", "response"))


def detect(raw: Mapping[str, Any], text_field: str = "text") -> str | None:
    """The layout of one row, or None when it is none of them."""
    if "messages" in raw:
        return "messages"
    if "conversations" in raw:
        return "sharegpt"
    if "instruction" in raw and "output" in raw:
        return "alpaca"
    if any(p in raw and r in raw for p, r in PAIR_NAMES) or "prompt" in raw or "response" in raw:
        return "pairs"
    if text_field in raw:
        return "text"
    return None


def _with_system(prompt: str, response: str, system: Any) -> dict[str, Any]:
    if system is None or (isinstance(system, str) and not system.strip()):
        return {"prompt": prompt, "response": response}
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": response}]}


def _sharegpt(turns: Any) -> list[dict[str, Any]]:
    if not isinstance(turns, list):
        raise ValueError("field 'conversations' must be a list of {from, value}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping) or "from" not in t or "value" not in t:
            raise ValueError(f"conversations[{i}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise ValueError(f"conversations[{i}] is from {t['from']!r}; known speakers are {', '.join(sorted(SHAREGPT_ROLES))}")
        out.append({"role": role, "content": t["value"]})
    return out


def reshape(raw: Any, fmt: str = "auto", fields: Mapping[str, str] | None = None, text_field: str = "text") -> Any:
    """``raw`` in the field names ``normalize_record`` reads; a row that is not an object is returned as it is (the
    normaliser says what is wrong with it). ``ValueError`` names a field the row lacks."""
    if not isinstance(raw, Mapping):
        return raw
    if fields:
        missing = [f"{ours} ← {theirs!r}" for ours, theirs in fields.items() if theirs not in raw]
        if missing and len(missing) == len(fields):
            found = ", ".join(repr(k) for k in raw) or "none"
            raise ValueError(f"none of data.fields is in this row ({', '.join(missing)}; found {found})")
        raw = {**{k: v for k, v in raw.items() if k not in fields.values()},
               **{ours: raw[theirs] for ours, theirs in fields.items() if theirs in raw}}
    kind = detect(raw, text_field) if fmt == "auto" else fmt
    if kind == "sharegpt":
        if "conversations" not in raw:
            raise ValueError("data.format sharegpt needs a 'conversations' field")
        return {"messages": _sharegpt(raw["conversations"])}
    if kind == "alpaca":
        if "instruction" not in raw or "output" not in raw:
            raise ValueError("data.format alpaca needs 'instruction' and 'output' fields ('input' is optional)")
        extra = raw.get("input")
        prompt = raw["instruction"] if not isinstance(extra, str) or not extra.strip() else f"{raw['instruction']}\n\n{extra}"
        return _with_system(prompt, raw["output"], raw.get("system"))
    if kind == "pairs":
        for p, r in PAIR_NAMES:
            if p in raw and r in raw:
                if raw.get("system") is not None:
                    return _with_system(raw[p], raw[r], raw["system"])
                return {"prompt": raw[p], "response": raw[r]}
        if fmt == "pairs":
            pairs = ", ".join(f"{p}/{r}" for p, r in PAIR_NAMES)
            raise ValueError(f"data.format pairs needs one of {pairs} (or data.fields naming prompt and response)")
    if kind == "messages" and "messages" not in raw:
        raise ValueError("data.format messages needs a 'messages' field")
    if kind == "text" and text_field not in raw and fmt == "text":
        raise ValueError(f"data.format text needs the {text_field!r} field (data.text_field)")
    return raw
