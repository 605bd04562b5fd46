"""What the run page shows, read from a run directory's files as they grow: ``metrics.jsonl`` (a row per client step,
flushed after each round), ``evals.jsonl`` (rewritten as each evaluation ends), ``config.yaml``, ``opening.json`` (the
plan, with the ε each defense will have spent by the last step) and ``summary.json`` (once the run is done).

Only the files: the dashboard never touches a training process, so it may watch a run on another machine's disk,
or one that ended long ago. The metrics are read incrementally (a poll reads only the bytes written since the last).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import yaml

from .http import DashboardError

MAX_ROWS = 5000  # rows per answer: a long run's history arrives over a few polls
BREAKDOWN = ("compute_s", "codec_s", "wait_s", "server_s", "wire_s")
SUMMARY_KEYS = ("eval_loss_before", "eval_loss_after", "eval_ppl_before", "eval_ppl_after", "eval_accuracy_before",
                "eval_accuracy_after", "wall_s", "step_s_median", "bytes_up", "bytes_down", "codec_error_up", "codec_error_down",
                "train_loss_first", "train_loss_last")


def _plain(defense: dict) -> dict:
    """A defense as the page shows it: its settings, never a seed (a client's noise is its own secret)."""
    return {k: v for k, v in defense.items() if "seed" not in k}


class RunView:
    """A run directory, polled: ``run()`` (its state), ``metrics(since)`` (new step rows), ``evals()``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DashboardError(f"{folder}: no such run directory")
        if not (self.folder / "config.yaml").is_file():
            raise DashboardError(f"{folder} is not a run directory (no config.yaml): give the --out of a `splittune train`")
        self.rows: list[dict] = []
        self.generation = 0  # bumped when metrics.jsonl is rewritten (a resumed run starts it again)
        self._offset, self._inode, self._lock = 0, None, threading.Lock()

    # -- files -----------------------------------------------------------------------------------------
    def _json(self, name: str) -> Any:
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, ValueError):  # absent, or caught mid-write: the next poll reads it
            return None

    def _lines(self, name: str) -> list[dict]:
        try:
            text = (self.folder / name).read_text()
        except OSError:
            return []
        return [row for row in map(_row, text.splitlines()) if row is not None]

    def _read_metrics(self) -> None:
        path = self.folder / "metrics.jsonl"
        try:
            with open(path, "rb") as f:
                stat = os.fstat(f.fileno())
                if stat.st_ino != self._inode or stat.st_size < self._offset:  # a new file, or one truncated to start again
                    self.rows, self._offset, self._inode = [], 0, stat.st_ino
                    self.generation += 1
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        done = data.rfind(b"\n") + 1  # a row still being written waits for the next poll
        self._offset += done
        self.rows.extend(row for row in map(_row, data[:done].decode(errors="replace").splitlines()) if row is not None)

    def config(self) -> dict:
        try:
            cfg = yaml.safe_load((self.folder / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}
        t, data = cfg.get("train") or {}, cfg.get("data") or {}
        return {"model": cfg.get("model"), "mode": cfg.get("mode"), "cuts": cfg.get("cuts"), "clients": cfg.get("clients"),
                "schedule": cfg.get("schedule"), "steps": t.get("steps"), "batch_size": t.get("batch_size"),
                "seq_len": t.get("seq_len"), "lr": t.get("lr"), "eval_every": t.get("eval_every"), "dtype": t.get("dtype"),
                "micro_batches": t.get("micro_batches"), "data": data.get("source"), "codec": cfg.get("codec"),
                "defenses": [_plain(d) for d in cfg.get("defense") or [] if isinstance(d, dict)],
                "dp_sgd": _plain(cfg["dp_sgd"]) if isinstance(cfg.get("dp_sgd"), dict) else None,
                "secure_aggregation": cfg.get("secure_aggregation")}

    def status(self, summary: dict | None) -> str:
        """``finished`` (summary.json), ``training`` (a live process holds the run's lock) or ``stopped``."""
        if summary is not None:
            return "finished"
        try:
            owner = json.loads((self.folder / ".lock").read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return "stopped"
        if owner.get("host") != socket.gethostname():
            return "training"  # another machine's process: its lock file is what there is to go by
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "stopped"  # it died without releasing the lock
        except PermissionError:
            pass
        return "training"

    # -- endpoints ---------------------------------------------------------------------------------------
    def run(self, query: dict | None = None) -> dict:
        with self._lock:
            self._read_metrics()
            rows = self.rows
        summary = self._json("summary.json")
        opening = self._json("opening.json") or (summary or {}).get("opening") or {}
        config = self.config()
        clients: dict[int, dict] = {}
        for row in rows:
            c = clients.setdefault(row.get("client", 0), {"client": row.get("client", 0), "steps_taken": 0, "bytes_up": 0,
                                                          "bytes_down": 0, "tokens": 0})
            c.update(step=row.get("step"), loss=row.get("loss"), lr=row.get("lr"))
            c["steps_taken"] += 1
            for key in ("bytes_up", "bytes_down", "tokens"):
                c[key] += row.get(key) or 0
        recent = rows[-20 * max(len(clients), 1):]
        timed = [r for r in recent if all(k in r for k in BREAKDOWN)]
        out = {
            "name": self.folder.resolve().name, "status": self.status(summary), "config": config,
            "step": max((r.get("step", 0) for r in rows), default=0), "steps": config.get("steps"), "rows": len(rows),
            "generation": self.generation, "clients": [clients[k] for k in sorted(clients)],
            "bytes_up": sum(c["bytes_up"] for c in clients.values()), "bytes_down": sum(c["bytes_down"] for c in clients.values()),
            "breakdown": {k: sum(r[k] for r in timed) / len(timed) for k in ("step_s", *BREAKDOWN)} if timed else None,
            "codec_error": {d: rows[-1][f"codec_error_{d}"] for d in ("up", "down") if rows and f"codec_error_{d}" in rows[-1]},
            "privacy": {"planned": opening.get("defenses") or {},
                        "spent": {k: v for k, v in (summary or {}).items() if k.endswith("_epsilon")}},
            "summary": {k: summary[k] for k in SUMMARY_KEYS if k in summary} if summary else None,
        }
        return out

    def metrics(self, query: dict) -> dict:
        """Rows from ``since`` on (all, when the page's ``generation`` is not the file's: it was rewritten)."""
        with self._lock:
            self._read_metrics()
            since = max(_int(query.get("since")), 0)
            if _int(query.get("generation"), -1) != self.generation:
                since = 0
            return {"generation": self.generation, "from": since, "rows": self.rows[since:since + MAX_ROWS],
                    "total": len(self.rows)}

    def evals(self, query: dict | None = None) -> dict:
        return {"rows": self._lines("evals.jsonl")}

    def endpoints(self) -> dict:
        return {"run": self.run, "metrics": self.metrics, "evals": self.evals}


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
