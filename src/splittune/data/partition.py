"""Splitting one dataset across clients (data owners), and pooling clients' tasks back together.

Records are partitioned *before* tokenizing, by document, so a client's held-out documents never reach
another client's training, and each client's task is built exactly as a single-client task is. Every
random choice is seeded (``seed_for``), so the same config gives every client the same data on every run.
A one-client iid partition is the identity: a run with ``clients: 1`` equals the single-client run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..config import RunConfig
from .choices import merge_choices
from .errors import DataError
from .records import Record
from .sources import load_records
from .split import permutation, seed_for, split_indices
from .task import TaskData, build_task_from_records, resolve_kind

METHODS = ("iid", "dirichlet")  # partitions of one source; by_source gives each client its own source
MIN_RECORDS = 2  # per client: one to train on, one held out for evaluation
DIRICHLET_ATTEMPTS = 100


def _check(records: Sequence[Record], n_clients: int, method: str, alpha: float, source: str) -> None:
    if method not in METHODS:
        raise DataError(f"unknown partition method {method!r}; allowed: {', '.join(METHODS)}")
    if n_clients < 1:
        raise DataError(f"clients={n_clients}: at least one client is needed")
    if alpha <= 0:
        raise DataError(f"partition_alpha={alpha} must be > 0 (small: skewed clients, large: near-iid)")
    if n_clients * MIN_RECORDS > len(records):
        raise DataError(
            f"clients={n_clients} need at least {n_clients * MIN_RECORDS} documents ({MIN_RECORDS} each: one is "
            f"held out for evaluation); {source} has {len(records)}"
        )


def _cut(items: list[int], proportions: np.ndarray) -> list[list[int]]:
    """``items`` cut into consecutive parts of (about) the given proportions; the last takes the rounding."""
    bounds = [min(len(items), int(c * len(items))) for c in np.cumsum(proportions)[:-1]]
    return [items[a:b] for a, b in zip([0, *bounds], [*bounds, len(items)], strict=True)]


def _iid(n_records: int, n_clients: int, seed: int) -> list[list[int]]:
    order = permutation(n_records, "partition", "iid", seed)
    size, extra = divmod(n_records, n_clients)
    starts = [i * size + min(i, extra) for i in range(n_clients + 1)]
    return [order[starts[i] : starts[i + 1]] for i in range(n_clients)]


def _dirichlet(records: Sequence[Record], n_clients: int, alpha: float, seed: int, attempt: int) -> list[list[int]]:
    """Label skew (Hsu et al. 2019) for labelled records: each label's records go to the clients in
    Dirichlet(alpha) proportions; quantity skew over documents for any other records."""
    rng = np.random.default_rng(seed_for("partition", "dirichlet", seed, attempt))
    if all("label" in r for r in records):
        groups = {}
        for i, r in enumerate(records):
            groups.setdefault(r["label"], []).append(i)
    else:
        groups = {None: list(range(len(records)))}
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for label in sorted(groups, key=str):
        members = groups[label]
        shuffled = [members[j] for j in permutation(len(members), "partition", "dirichlet", seed, attempt, label)]
        for client, part in enumerate(_cut(shuffled, rng.dirichlet(np.full(n_clients, alpha)))):
            parts[client] += part
    return parts


def partition_records(
    records: Sequence[Record], n_clients: int, method: str, alpha: float, seed: int, *, source: str = "the data"
) -> list[list[int]]:
    """Indices of ``records`` for each client: disjoint, covering all, each ascending (source order kept).

    ``iid``: a seeded shuffle cut into near-equal parts. ``dirichlet``: label skew (labelled records) or
    quantity skew (others) with concentration ``alpha``, redrawn until every client has at least 2 records.
    ``source`` names the data in error messages.
    """
    _check(records, n_clients, method, alpha, source)
    if n_clients == 1:
        return [list(range(len(records)))]
    if method == "iid":
        return [sorted(part) for part in _iid(len(records), n_clients, seed)]
    for attempt in range(DIRICHLET_ATTEMPTS):
        parts = _dirichlet(records, n_clients, alpha, seed, attempt)
        if min(len(part) for part in parts) >= MIN_RECORDS:
            return [sorted(part) for part in parts]
    raise DataError(
        f"Dirichlet(alpha={alpha}) kept leaving a client with fewer than {MIN_RECORDS} documents in "
        f"{DIRICHLET_ATTEMPTS} draws ({source} has {len(records)} for clients={n_clients}); "
        "use a larger partition_alpha or fewer clients"
    )


def _client_records(cfg: RunConfig) -> list[tuple[str, list[Record]]]:
    """(source, records) of each client."""
    if cfg.partition == "by_source":
        sources = [cfg.client_source(i) for i in range(cfg.clients)]
        return [(s, load_records(cfg.data.model_copy(update={"source": s}))) for s in sources]
    records = load_records(cfg.data)
    resolve_kind(cfg.data.task, records)  # a source mixing kinds fails here, not as clients of different kinds
    where = f"data source {cfg.data.source!r}"
    if cfg.data.max_documents is not None:
        where += f" (max_documents={cfg.data.max_documents})"
    parts = partition_records(records, cfg.clients, cfg.partition, cfg.partition_alpha, cfg.seed, source=where)
    return [(cfg.data.source, [records[i] for i in part]) for part in parts]


def build_client_tasks(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> list[TaskData]:
    """One task per client, each built from its own records exactly as :func:`build_task` builds one.

    ``stats`` gains ``client``, ``records`` and, for labelled data, ``labels``: the label histogram of the
    client's training records (how skewed the partition is).
    """
    clients = _client_records(cfg)
    kinds = [resolve_kind(cfg.data.task, records) for _, records in clients]
    if len(set(kinds)) > 1:
        listed = ", ".join(f"client {i} ({s}): {k}" for i, ((s, _), k) in enumerate(zip(clients, kinds, strict=True)))
        raise DataError(f"every client must have the same task, but {listed}; give all clients one kind of data")
    tasks = []
    for i, (source, records) in enumerate(clients):
        data_cfg = cfg.data if source == cfg.data.source else cfg.data.model_copy(update={"source": source})
        try:
            task = build_task_from_records(records, data_cfg, tokenizer, cfg.train.seq_len, cfg.seed)
        except DataError as err:
            if cfg.clients == 1:
                raise
            raise DataError(f"client {i} ({source}, {len(records)} documents): {err}") from err
        task.stats.update(client=i, records=len(records))
        if all("label" in r for r in records):
            train_idx, _ = split_indices(len(records), data_cfg.eval_fraction, cfg.seed)  # the split the task made
            task.stats["labels"] = dict(sorted(Counter(records[j]["label"] for j in train_idx).items()))
        tasks.append(task)
    return tasks


def merge_tasks(tasks: Sequence[TaskData]) -> TaskData:
    """The union of clients' tasks, in client order: the global evaluation set (every client's held-out
    data) and the pooled training set of the centralized baseline. Counts in ``stats`` are summed; each
    client's own stats are kept under ``per_client``."""
    if not tasks:
        raise DataError("no tasks to merge")
    kinds, pads = {t.kind for t in tasks}, {t.pad_id for t in tasks}
    if len(kinds) > 1 or len(pads) > 1:
        raise DataError(f"cannot merge tasks of different kinds {sorted(kinds)} or pad ids {sorted(pads)}")
    first = tasks[0]
    if len(tasks) == 1:
        return TaskData(first.kind, list(first.train), list(first.eval), first.pad_id, first.choices, dict(first.stats))
    sources = list(dict.fromkeys(str(t.stats.get("source")) for t in tasks))
    stats: dict = {"source": ", ".join(sources), "task": first.kind, "clients": len(tasks)}
    for key, value in first.stats.items():
        counts = [t.stats.get(key) for t in tasks]
        if key != "client" and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            stats[key] = sum(counts)
    if all("labels" in t.stats for t in tasks):
        total: Counter = sum((Counter(t.stats["labels"]) for t in tasks), Counter())
        stats["labels"] = dict(sorted(total.items()))
    stats["per_client"] = [dict(t.stats) for t in tasks]
    return TaskData(
        first.kind,
        [e for t in tasks for e in t.train],
        [e for t in tasks for e in t.eval],
        first.pad_id,
        merge_choices([t.choices for t in tasks]),
        stats,
    )
