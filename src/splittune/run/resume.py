"""A run directory over time: created with its config and run id, resumed from its newest intact checkpoint,
stopped on request after a step, rolled back when a restarted peer rejoins. A checkpoint holds everything the loop
needs to continue exactly (parties, chains, defenses, data position, RNG, metrics)."""

from __future__ import annotations

import functools
import secrets
import threading
from pathlib import Path

import yaml
from typing import TYPE_CHECKING, Callable

from .. import checkpoint
from ..config import ConfigError, RunConfig, dump_config, load_config, warn
from ..device import rng_state, set_rng_state
from ..rundir import RunLock
from ..threads import compute_threads
from .assemble import parallel

if TYPE_CHECKING:
    from .loop import Loop


STOP = threading.Event()  # set by a signal handler: finish the step, checkpoint, stop


class Interrupted(Exception):
    """A run stopped on request after ``step``, with a checkpoint to resume from (step 0: before any step, with
    nothing to resume from)."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}; the checkpoint is saved: run the same command to resume" if step
                         else "stopped before the first step (nothing to resume from): run the same command to start again")
        self.step = step


class EvalStopped(Exception):
    """A stop request during an evaluation: the evaluation is abandoned, not finished (it may take minutes)."""


CHECKPOINTS = "checkpoint"


def owns_run_dir(shared: Callable[[RunConfig], bool]):
    """A run function that holds ``out``'s lock (rundir.py) and computes with ``train.threads`` while it runs;
    ``shared(cfg)``: whether several parties share this process (the ``auto`` thread count depends on it)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg: RunConfig, out: Path, *args, **kwargs):
            with RunLock(out, "run"), compute_threads(cfg.train.threads, shared(cfg)):
                return fn(cfg, out, *args, **kwargs)
        return run
    return wrap


def with_defense_seed(cfg: RunConfig, out: Path) -> RunConfig:
    """A run with defenses draws their noise from ``defense_seed``; unset, it is the seed this run directory's config
    recorded (a resume), else a fresh random one, which config.yaml then records."""
    if not (cfg.defense or cfg.dp_sgd) or cfg.defense_seed is not None:
        return cfg
    saved = load_config(out / "config.yaml").defense_seed if (out / "config.yaml").exists() else None
    return cfg.model_copy(update={"defense_seed": saved if saved is not None else secrets.randbits(62)})


def saved_link_states(out: Path, step: int | None) -> dict[int, dict]:
    """Each client's cut-link state (both ends' chains: error-feedback residuals) in the checkpoint at ``step``;
    a resumed session's hello hands the server its end's back."""
    if step is None:
        return {}
    flat, _ = checkpoint.load(out / CHECKPOINTS / "client", step)
    states: dict[int, dict] = {}
    for key, t in flat.items():
        group, _, name = key.partition("/")
        if group.startswith("c") and group.endswith(".link"):
            states.setdefault(int(group[1:-5]), {})[name] = t
    return states


RUN_ID = "run-id"


def run_identity(out: Path) -> str:
    """This run's id: random, made with its run directory and kept there, so a resume is the same run to the server
    and two runs with the same config never share what the server keeps of them."""
    path = out / RUN_ID
    if path.exists():
        return path.read_text().strip()
    made = secrets.token_hex(8)
    path.write_text(made + "\n")
    return made


def prepare_run_dir(cfg: RunConfig, out: Path) -> int | None:
    """Create the run directory, or find the step to resume from in it (the same command resumes).

    ``cfg`` is the resolved config (``resolved``); the caller holds the directory's lock (``owns_run_dir``).
    """
    out.mkdir(parents=True, exist_ok=True)
    resume = checkpoint.latest(out / CHECKPOINTS / "client", warn)
    if resume is not None:
        saved = (out / "config.yaml").read_text() if (out / "config.yaml").exists() else ""
        if saved != dump_config(cfg):
            changed = config_changes(yaml.safe_load(saved) or {}, yaml.safe_load(dump_config(cfg)))
            if set(changed) != {"train.steps"} or changed["train.steps"][1] <= resume:
                listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
                raise ConfigError(f"{out} holds a checkpoint (step {resume}) of another config ({listed}); resume with the "
                                  "same config, continue it with only a larger train.steps, or use another --out")
            before, after = changed["train.steps"]
            warn(f"continuing {out} from step {resume} to step {after} (it was set to {before}): the learning-rate schedule "
                 f"now spans {after} steps, so the steps from here follow an {after}-step run's rates")
            (out / "config.yaml").write_text(dump_config(cfg))
        return resume
    (out / "config.yaml").write_text(dump_config(cfg))
    return None


def config_changes(before: dict, after: dict, prefix: str = "") -> dict[str, tuple]:
    """The dotted keys whose values differ between two dumped configs, with both values."""
    out: dict[str, tuple] = {}
    for key in dict.fromkeys([*before, *after]):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out


def rejoin_from(out: Path, step: int, why: str) -> int | None:
    """A restarted peer rejoined the run at ``step``: this client goes back to its own checkpoint of that step (the
    later ones belong to a timeline the run left) and says so. Returns the step to resume from (None: the start)."""
    root = out / CHECKPOINTS / "client"
    problem = checkpoint.damage(root / f"step-{step}") if step else None
    if problem is not None:
        raise ConfigError(f"a peer rejoined the run from step {step}, but {out} holds no intact checkpoint of that step "
                          f"({problem}); restart every client of the run")
    checkpoint.discard_after(root, step)
    warn(f"{why}: resuming from " + (f"the checkpoint at step {step}" if step else "the start"))
    return step or None


# -- checkpoints (stage-independent: everything needed to continue exactly) -----------------------------
def save_loop(loop: "Loop", step: int) -> None:
    """The server saves its part first, then this process saves its clients: a killed client always finds
    the server holding its step (the server keeps the last two)."""
    if loop.fleet.links[0] is not None:
        if not loop.fleet.clients[0].server_info.get("checkpoints"):
            return  # a server without --state could not resume its part: a client checkpoint alone is useless
        parallel(lambda c: c.checkpoint(step), loop.fleet.clients, loop.fleet.abort)
    groups, parties = {}, {}
    for index, client in zip(loop.index, loop.fleet.clients):
        parts, parties[str(index)] = client.party.checkpoint()
        groups.update({f"c{index}.{name}": t for name, t in parts.items()})
        if client.link is not None:
            groups[f"c{index}.link"] = client.link.state()
        if client.defenses:
            groups[f"c{index}.defense"] = client.defenses.state_dict()
    groups["rng"] = rng_state()
    meta = {"step": step, "samplers": [s.state_dict() for s in loop.samplers], "metrics": loop.metrics,
            "evals": loop.evals, "own_before": loop.own_before, "train_bytes": loop.train_bytes,
            "sync_bytes": loop.sync_bytes, "done": loop.done, "holder": loop.holder,
            "parties": parties,
            "caches": {str(index): c.cache.state() for index, c in zip(loop.index, loop.fleet.clients) if c.cache is not None}}
    checkpoint.save(loop.out / CHECKPOINTS / "client", step, checkpoint.pack(groups), meta)


def restore_loop(loop: "Loop", step: int) -> None:
    flat, meta = checkpoint.load(loop.out / CHECKPOINTS / "client", step)
    groups = checkpoint.unpack(flat)
    for index, client in zip(loop.index, loop.fleet.clients):
        prefix = f"c{index}."
        client.party.restore({k.removeprefix(prefix): v for k, v in groups.items() if k.startswith(prefix)}, meta["parties"][str(index)])
        if client.defenses:
            client.defenses.load_state_dict(groups.get(f"{prefix}defense", {}))
        if client.cache is not None and str(index) in meta.get("caches", {}):
            client.cache.load_state(meta["caches"][str(index)])
    for sampler, state in zip(loop.samplers, meta["samplers"], strict=True):
        sampler.load_state_dict(state)
    set_rng_state(groups["rng"])
    loop.metrics, loop.evals, loop.own_before = meta["metrics"], meta["evals"], meta["own_before"]
    loop.train_bytes, loop.sync_bytes, loop.done, loop.holder = meta["train_bytes"], meta["sync_bytes"], meta["done"], meta["holder"]
    loop.start = step
