"""Print what moved between two lists of pins (``make lock``: the old and new lock; or a lock and ``pip freeze``):
added, removed and changed versions. Names compare as PEP 503 normalises them (``typing_extensions`` is
``typing-extensions``)."""

import re
import sys

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)")


def pins(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        return {re.sub(r"[-_.]+", "-", m[1]).lower(): m[2] for m in map(PIN.match, f) if m}


def main(old_path: str, new_path: str) -> None:
    old, new = pins(old_path), pins(new_path)
    lines = [f"  {name} {old.get(name, '-')} -> {new.get(name, '-')}" for name in sorted(old.keys() | new.keys())
             if old.get(name) != new.get(name)]
    print("the lock moved:\n" + "\n".join(lines) if lines else "the lock did not move")


if __name__ == "__main__":
    main(*sys.argv[1:3])
