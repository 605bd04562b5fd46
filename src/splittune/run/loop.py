"""One run: ``train`` (every party in this process) and ``train_remote`` (one client process of a deployed run,
``remote.py``) build the run (``assemble``), resume it (``resume``) and drive the ``Loop``: every stage of DESIGN.md's pipeline
in the order the schedule gives, with evaluations, checkpoints and the run directory's outputs.

``mode: split`` builds the clients and a server joined by local channels; ``mode: centralized`` runs the same
client code with the whole model and no channel (the baseline shares everything else); ``mode: federated`` gives
every client the whole model and uses the server only to average. Clients run in threads, as they would run in
processes: the server orders their requests (schedules/).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError, RunConfig, warn
from ..data import TaskData, merge_tasks
from ..eval import evaluate
from ..eval.generative import generated_scores
from ..models.arch import detect_arch
from ..models.zoo import ModelSource, resolve_model
from ..parties import Client
from ..parties.server.group import personal_names
from ..taps.recording import SENT, TAP_DIR, Recording, SentLog
from ..report.plots import plot_loss
from ..schedules.policy import policy_for
from ..schedules.sampling import round_of
from ..track import open_trackers
from .adapters import ADAPTERS, save_adapters
from .assemble import Fleet, client_tasks, connect, parallel, set_seed
from .resume import (CHECKPOINTS, STOP, EvalStopped, Interrupted, owns_run_dir, prepare_run_dir, restore_loop, run_identity,
                     save_loop, saved_link_states, with_defense_seed)
from .summary import summarize, time_breakdown, title
from .opening import opening

UNDEFENDED_RATIO = 2.0  # eval perplexity with the defenses over without them, past which a run warns


@contextlib.contextmanager
def global_view(client: Client, global_state: dict[str, torch.Tensor], personal: set[str], whole: bool = False):
    """Client 0 with its personal segments replaced by their average (``whole``: everything it holds, when sampled
    rounds may have left it out of the last averages): the global model, for evaluation."""
    arch = client.party.spec
    own = client.party.state()
    keep = (set(own) if whole else personal_names(own, client.plan, personal, arch)) & set(global_state)
    if not keep:
        yield client
        return
    client.party.load_state({k: global_state[k] for k in keep})
    try:
        yield client
    finally:
        client.party.load_state({k: own[k] for k in keep})


def computes_concurrently(cfg: RunConfig) -> bool:
    """Whether parties of an in-process run compute at the same time (and so must share the cores): several
    clients run their steps at once, and pipelined micro-batches overlap the client with the server. One
    client without pipelining takes turns with the server, and one pool of every core serves both."""
    return cfg.mode != "centralized" and (cfg.clients > 1 or cfg.train.micro_batches > 1)


def resolved(cfg: RunConfig, source: ModelSource) -> RunConfig:
    """The run's config for this model (``cuts: auto`` resolved): what config.yaml records and resume compares."""
    return cfg.resolve(detect_arch(source.config()).n_blocks)


@owns_run_dir(shared=lambda cfg: computes_concurrently(cfg))
def train(cfg: RunConfig, out: Path, progress: Callable | None = None, record_tap: tuple[str, ...] = (),
          tap_max_bytes: int = 1 << 30) -> dict[str, Any]:
    """Run ``cfg`` and write its run directory; returns the summary.

    ``progress(done, total, row)`` is called after every client step with its metrics row (the CLI draws a
    progress bar with it), and with ``row["phase"]`` set for what is not a step (see ``Loop.event``).
    ``record_tap`` names the observers whose taps the run records in ``out/tap`` (each at most ``tap_max_bytes``).
    """
    started = time.perf_counter()
    set_seed(cfg.seed)
    source = resolve_model(cfg.model)
    cfg = with_defense_seed(resolved(cfg, source), out)
    resume = prepare_run_dir(cfg, out)
    recording = _recording(cfg, out, record_tap, tap_max_bytes, resume)
    tasks = client_tasks(cfg, source.tokenizer())
    pooled = merge_tasks(tasks) if len(tasks) > 1 else tasks[0]
    ledger = SentLog(out / SENT, append=resume is not None) if cfg.mode != "centralized" else None
    fleet = None
    try:
        fleet = connect(cfg, source, [len(task.train) for task in tasks], resume=resume, state_dir=out / CHECKPOINTS / "server",
                        run_id=run_identity(out),
                        link_states=saved_link_states(out, resume), recording=recording, ledger=ledger)
        # the fleet stays usable after the run (tests and tools read its parties); nobody holding it stops its threads
        return Loop(cfg, fleet, tasks, pooled, out, progress, started, resume).run()
    finally:
        for record in (recording, ledger):
            if record is not None:
                record.close()
        if fleet is not None and cfg.engine == "ray":  # the trunk's actor holds a model and the cluster's resources
            fleet.close()


def _recording(cfg: RunConfig, out: Path, observers: tuple[str, ...], max_bytes: int, resume: int | None) -> Recording | None:
    """The taps a run records, or a ConfigError saying why this run cannot record them."""
    if not observers:
        return None
    if cfg.mode == "centralized":
        raise ConfigError("--record-tap records what crosses a cut, and mode: centralized has no cut")
    if cfg.engine == "ray":
        raise ConfigError("--record-tap taps the server in this process, and engine: ray runs it in a Ray actor; record "
                          "with engine: local (the same run, bit for bit)")
    if resume is not None:
        raise ConfigError(f"--record-tap records a whole run, and {out} resumes one from step {resume}; record into a new --out")
    if (out / TAP_DIR).exists():
        raise ConfigError(f"{out / TAP_DIR} already holds a tap; record into a new --out")
    return Recording(out / TAP_DIR, observers, max_bytes)


def train_batch(task: TaskData, indices: list[int]) -> dict[str, torch.Tensor]:
    """A training batch of ``task``'s examples ``indices``, with their ``sample_id``: a row's identity for the
    activation cache (``parties/cache.py``)."""
    batch = task.collate([task.train[k] for k in indices])
    batch["sample_id"] = torch.tensor(indices, dtype=torch.int64)
    return batch


def defense_cost(defended_ppl: float, undefended_ppl: float, limit: float) -> str | None:
    """The warning for defenses that multiply eval perplexity by more than ``limit``, or None."""
    ratio = defended_ppl / max(undefended_ppl, 1e-12)
    if ratio <= limit:
        return None
    return (f"the defenses multiply eval perplexity by {ratio:,.1f} ({defended_ppl:,.1f} with them, {undefended_ppl:,.1f} "
            "without: the adapter on its own); training followed a much noisier model than the one exported, so weaken "
            "them (a smaller sigma, a larger epsilon) if that is not intended")


class Loop:
    """The training loop of one run: client steps in schedule order, averages, evaluations, outputs."""

    def __init__(self, cfg, fleet: Fleet, tasks: list[TaskData], pooled: TaskData, out: Path, progress, started: float,
                 resume: int | None = None):
        self.cfg, self.fleet, self.tasks, self.pooled, self.out, self.progress, self.started = cfg, fleet, tasks, pooled, out, progress, started
        self.n = len(tasks)  # clients in this process
        self.index = fleet.indices  # their indices in the run
        self.total = cfg.clients if cfg.mode != "centralized" else 1  # clients in the run
        self.policy = policy_for(cfg.mode, cfg.schedule)
        self.schedule = self.policy.name
        self.roster = self.policy.roster(self.total, cfg.round_size if cfg.samples_clients else None, cfg.seed)
        # client steps this process takes over the run (rounds sample some clients of the run)
        self.planned = sum(len(steps) for rnd in self.policy.rounds(self.roster, cfg.train.steps, cfg.aggregate_every)
                           for c, steps in rnd.turns if c in fleet.indices)
        self.samplers = [iter(task.sampler(cfg.train.batch_size, cfg.seed)) for task in tasks]
        self.metrics: list[dict] = []
        self.evals: list[dict] = []
        self.train_bytes = [[0, 0] for _ in tasks]
        self.sync_bytes = [[0, 0] for _ in tasks]
        self.done = 0
        self.holder = 0  # the client holding the latest model (the sequential relay moves it)
        self.start = 0  # the last completed step (a resumed run continues after it)
        self.own_before: list[dict] = []
        self.undefended: dict | None = None  # the final evaluation without the defenses (in-process, defended runs)
        self.trackers: list = []  # report_to: the tracking tools fed as the run goes (opened by ``run``)
        self._check_settings()
        if resume is not None:
            restore_loop(self, resume)

    def _check_settings(self) -> None:
        """Settings that run but hardly as meant: a warning each (the CLI prints a ``warning:`` line)."""
        t = self.cfg.train
        smallest = min(len(task.train) for task in self.tasks)
        if t.batch_size > smallest:
            whose = " of the smallest client" if self.n > 1 else ""
            warn(f"train.batch_size={t.batch_size} is larger than the training set ({smallest} examples{whose}): "
                 "every batch repeats examples; lower train.batch_size or use more data")
        if t.warmup_steps >= t.steps:
            warn(f"train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}: the learning rate is still warming up "
                 "when training ends (the first step has rate 0); lower train.warmup_steps")
        if t.eval_metrics and self.pooled.kind != "instruction":
            warn(f"train.eval_metrics scores generated answers to instruction prompts; this run's data is {self.pooled.kind}: none are scored")
        off = self.fleet.clients[0].cache_off
        asked = self.cfg.cache.max_bytes not in (0, type(self.cfg.cache).model_fields["max_bytes"].default)  # not merely a dumped default
        if asked and off and self.fleet.clients[0].split:
            warn(f"cache.max_bytes is set, but the activation cache is off: {off}")

    def event(self, phase: str, done: int = 0, total: int = 0, **info) -> None:
        """Tell ``progress`` what happens besides steps: ``start`` (the plan: cuts, shape, threads, ``resume``: the
        step a resumed run continues after), ``eval`` (batch ``done`` of ``total`` of the evaluation ``label``) and
        ``evaluated`` (its ``loss`` and ``ppl``)."""
        if self.progress:
            self.progress(done, total, {"phase": phase, **info})

    # -- one client step ----------------------------------------------------------------------------------
    def _step(self, job: tuple[int, int]) -> dict:
        """One client step, as its metrics row: what the client's report says it did."""
        i, step = job
        t = self.cfg.train
        task, client = self.tasks[i], self.fleet.clients[i]
        report = client.train_step(step, [train_batch(task, next(self.samplers[i])) for _ in range(t.grad_accum)])
        self.train_bytes[i][0] += report.bytes_up
        self.train_bytes[i][1] += report.bytes_down
        row = {"step": step, "client": self.index[i], "loss": report.loss, "lr": report.lr, "tokens": report.tokens,
               "bytes_up": report.bytes_up, "bytes_down": report.bytes_down, "step_s": round(report.step_s, 6)}
        if report.link is not None:
            row.update(time_breakdown(report.step_s, report.link))
            row["bottom_s"] = round(report.bottom_s, 6)
        row.update(report.figures)  # the defenses' own (NoPeek's distance correlation)
        if report.cache_hits is not None:
            row.update(cache_hits=report.cache_hits, cache_misses=report.cache_misses)
        if report.loss_scale is not None:
            row.update(loss_scale=report.loss_scale, skipped=report.skipped)
        return row

    def _round(self, jobs: list[tuple[int, int]], log) -> None:
        for row in parallel(self._step, jobs, self.fleet.abort):
            self.metrics.append(row)
            log.write(json.dumps(row) + "\n")
            for tracker in self.trackers:
                tracker.step(row)
            self.done += 1
            if self.progress:
                self.progress(self.done, self.planned, row)
        log.flush()

    def _sync(self, i: int, call: Callable[[Client], None]) -> None:
        """An average or a relay: traffic counted apart from the steps' (and in the totals)."""
        client = self.fleet.clients[i]
        with client.traffic() as sent:
            call(client)
        self.sync_bytes[i][0] += sent.up
        self.sync_bytes[i][1] += sent.down

    # -- evaluation ------------------------------------------------------------------------------------
    def _evaluate(self, client_index: int, task: TaskData, view=contextlib.nullcontext, label: str = "evaluation",
                  generate: bool = False) -> dict:
        t = self.cfg.train
        i = client_index

        def on_batch(done: int, total: int) -> None:
            if STOP.is_set():  # a stop request does not wait for the evaluation to end
                raise EvalStopped(label)
            self.event("eval", done, total, label=label)

        client = self.fleet.clients[i]
        with view(), client.traffic() as sent:
            result = evaluate(client, task, t.batch_size, t.eval_batches, on_batch=on_batch)
            if generate and t.eval_metrics:  # answers generated and scored (train.eval_metrics, eval/generative.py)
                result.update(generated_scores(client, self.cfg, task, self.fleet.source.tokenizer()))
        if self.fleet.links[i] is not None:  # evaluation traffic is reported, kept out of the training counts
            result["bytes_up"], result["bytes_down"] = sent.up, sent.down
        self.event("evaluated", label=label, loss=result["loss"], ppl=result["ppl"])
        return result

    def _undefended_eval(self, after: dict) -> dict | None:
        """In-process, with a defense that changes what is evaluated: the final model once more without it (what the
        exported adapter does on its own), and a warning when the defense multiplies perplexity by more than 2.
        Never in a deployment: the server would see undefended activations."""
        client = self.fleet.clients[self.holder]
        if self.fleet.server is None or not client.defended:
            return None
        result = self._evaluate(self.holder, self.pooled, client.undefended, "after training, without the defenses")
        message = defense_cost(after["ppl"], result["ppl"], UNDEFENDED_RATIO)
        if message is not None:
            warn(message)
        return result

    def _label(self, step: int, client: int | None = None) -> str:
        when = "before training" if step == 0 else "after training" if step == self.cfg.train.steps else f"at step {step}"
        return when if client is None else f"client {client} {when} (own model, own data)"

    def _global_eval(self, step: int) -> dict:
        """The global model on the held-out data of this process's clients (all of them in-process)."""
        personal = set(self.cfg.personal)
        sampled = self.roster.samples and self.policy.averages(self.total)
        if (personal or sampled) and step > 0:
            state = self.fleet.clients[0].global_state(step + 1 if sampled else 0)  # (the average of this step, once in)
            view = lambda: global_view(self.fleet.clients[0], state, personal, sampled)  # noqa: E731
            result = self._evaluate(0, self.pooled, view, self._label(step), generate=True)
        else:
            result = self._evaluate(self.holder, self.pooled, label=self._label(step), generate=True)
        row = {"step": step, **result, "train_bytes": sum(u + d for u, d in self.train_bytes) + sum(u + d for u, d in self.sync_bytes)}
        self.evals.append(row)
        with open(self.out / "evals.jsonl", "w") as f:  # as each evaluation ends (the live dashboard reads it)
            f.writelines(json.dumps(e) + "\n" for e in self.evals)
        for tracker in self.trackers:
            tracker.evaluation(row)
        return row

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and step % every == 0 and step != self.cfg.train.steps

    # -- the schedules -----------------------------------------------------------------------------------
    def _train(self, log) -> None:
        """The policy's rounds: every client of this process takes its turns; the server orders them."""
        every = self.cfg.aggregate_every
        for rnd in self.policy.rounds(self.roster, self.cfg.train.steps, every, self.start):
            mine = [(self.index.index(c), steps) for c, steps in rnd.turns if c in self.index]
            if rnd.concurrent:
                last = rnd.turns[0][1][-1]
                if self.roster.samples:
                    self._join_round(last, [i for i, _ in mine])
                self._round([(i, last) for i, _ in mine], log)
                if rnd.sync == "aggregate":
                    parallel(lambda i: self._sync(i, lambda c: c.aggregate(last)), [i for i, _ in mine], self.fleet.abort)
            else:  # a relay: one client after another, each handing its model on
                for i, span in mine:
                    last = span[-1]
                    if span[0] > 1 or self.index[i] != rnd.turns[0][0]:  # (the run's first turn starts it)
                        self._sync(i, lambda c: c.take_over(span[0]))
                    for step in span:
                        self._round([(i, step)], log)
                    self._sync(i, lambda c: c.hand_on(last))
                    self.holder = i
                last = rnd.turns[0][1][-1]
            if self._eval_due(last):
                with contextlib.suppress(EvalStopped):  # stopping: the checkpoint below comes first
                    self._global_eval(last)
            self._maybe_stop(last)  # a relay checkpoints at the end of a round: every client is between turns
        if self.policy.relays and self.total > 1:
            for i in range(self.n):  # everyone ends with the final model
                self._sync(i, lambda c: c.take_over(0))
        elif self.roster.samples and self.policy.averages(self.total):  # those the last round left out: the final average
            last = self.roster.at(self.cfg.train.steps, every)
            for i in range(self.n):
                if self.index[i] not in last:
                    self._take_global(i, self.cfg.train.steps + 1)

    # -- client sampling ---------------------------------------------------------------------------------
    def _join_round(self, step: int, sampled: list[int]) -> None:
        """Before step ``step`` of a sampled run: a client whose round begins here and that the previous round left out
        takes the global model (it missed that average); every sampled client's LR schedule is at the run's step."""
        every = self.cfg.aggregate_every
        r = round_of(step, every)
        if (step - 1) % every == 0 and r > 1 and self.policy.averages(self.total):
            before = self.roster.of(r - 1)
            for i in sampled:
                if self.index[i] not in before:
                    self._take_global(i, step)
        if self.policy.own_schedules():
            for i in sampled:
                self.fleet.clients[i].party.catch_up(step)

    def _take_global(self, i: int, step: int = 0) -> None:
        """Client ``i`` takes the last average (``step``: the one before that step's round); its personal segments stay
        its own."""
        def take(client: Client) -> None:
            own = set(client.party.state())
            state = {k: v for k, v in client.global_state(step).items() if k in own}  # (not the server's blocks, nor folds)
            keep = personal_names(state, client.plan, set(self.cfg.personal), client.party.spec)
            client.party.load_state({k: v for k, v in state.items() if k not in keep})

        self._sync(i, take)

    def _maybe_stop(self, step: int) -> None:
        """Checkpoint when due (every ``checkpoint_every`` steps, at the end, on a stop request); stop if asked."""
        keep, steps = self.cfg.train.checkpoint_every, self.cfg.train.steps
        if (keep and step % keep == 0) or step == steps or STOP.is_set():
            save_loop(self, step)
        if STOP.is_set() and step < steps:
            raise Interrupted(step)

    def run(self) -> dict[str, Any]:
        self.trackers = open_trackers(self.cfg.report_to, self.out, self.total > 1)
        try:
            return self._run()
        finally:
            for tracker in self.trackers:
                tracker.close()

    def _run(self) -> dict[str, Any]:
        self.opening = opening(self)
        (self.out / "opening.json").write_text(json.dumps(self.opening))  # the plan and its ε, for the live dashboard
        self.event("start", self.done, self.planned, resume=self.start or None, cuts=self.cfg.cuts,
                   shape=self.fleet.clients[0].plan.shape, threads=torch.get_num_threads(), opening=self.opening)
        if STOP.is_set():  # asked to stop while the parties loaded
            raise Interrupted(self.start)
        if self.start == 0:
            try:
                before = self._global_eval(0)
                self.own_before = ([self._evaluate(i, task, label=self._label(0, self.index[i])) for i, task in enumerate(self.tasks)]
                                   if self.total > 1 else [before])
            except EvalStopped:
                raise Interrupted(0) from None
            if STOP.is_set():  # asked during the evaluation's last batch
                raise Interrupted(0)
        before, own_before = self.evals[0], self.own_before
        with open(self.out / "metrics.jsonl", "w") as log:
            log.writelines(json.dumps(row) + "\n" for row in self.metrics)  # a resumed run keeps the steps it had
            self._train(log)
        try:
            after = self._global_eval(self.cfg.train.steps)
            own_after = ([self._evaluate(i, task, label=self._label(self.cfg.train.steps, self.index[i]))
                          for i, task in enumerate(self.tasks)] if self.total > 1 else [after])
            self.undefended = self._undefended_eval(after)
        except EvalStopped:  # the last step's checkpoint is saved: the same command evaluates and finishes
            raise Interrupted(self.cfg.train.steps) from None
        with open(self.out / "evals.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in self.evals)
        save_adapters(self.out / ADAPTERS, self.fleet, self.cfg)
        plot_loss(self.metrics, self.evals, self.out / "loss.png", title(self))
        summary = summarize(self, before, after, own_before, own_after)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        for tracker in self.trackers:
            tracker.finish(self.cfg.model_dump(mode="json"), summary, [self.out / "loss.png"])
        return summary
