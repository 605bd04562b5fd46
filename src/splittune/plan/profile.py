"""A profile of a model on this machine: what one block, the model's prologue and its head cost in time
and memory for a micro-batch, and what every part weighs. Predictions (``cost.py``) are built from it.

Only three blocks load (a U-shaped client party with blocks 0, 1 and the last, plus the embeddings and the
head: DESIGN.md contract 3), since blocks of one architecture are alike; a 30-block model profiles in
seconds. Times are medians of interleaved repetitions with the thread count pinned, at two micro-batch
sizes, so a cost is ``fixed + per_token · tokens``. Memory is what autograd saves per block (each storage
counted once, weights excluded: ``saved_tensors_hooks``) and the high-water marks of the head's and a
block's backward above what was live when they began (the allocator's own events, ``torch.profiler``).
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ..config import RunConfig, validate
from ..models.arch import detect_arch
from ..models.partition import PlanError
from ..models.zoo import resolve_model
from .batches import data_batches
from .baseline import runtime_bytes
from .estimate import estimate_profile
from .fit import Fit, Profile
from .sizes import model_sizes


def base_config(model: str, batch: int, seq_len: int, dtype: str, device: str, data: str | None,
                cfg: RunConfig | None) -> RunConfig:
    """The run the profile is for: ``cfg`` (LoRA, segments, data, seed) with these settings."""
    tree = cfg.model_dump(mode="json") if cfg is not None else {}
    tree["model"] = model
    tree.setdefault("train", {}).update(batch_size=batch, seq_len=seq_len, dtype=dtype, device=device)
    if data is not None:
        tree.setdefault("data", {})["source"] = data
    return validate(tree)


def profile_model(model: str, batch: int = 4, seq_len: int = 128, dtype: str = "float32", device: str = "auto",
                  data: str | None = None, cfg: RunConfig | None = None, threads: int | None = None, reps: int = 5,
                  steps: int = 16, estimate: bool = False, progress: Callable[[str], None] | None = None) -> Profile:
    """Profile ``model`` for micro-batches of up to ``batch`` rows of ``seq_len`` tokens.

    ``cfg`` gives the LoRA settings and segment modes (the defaults when None); ``data`` (or ``cfg``'s data
    when given) is drawn for ``steps`` batches so bytes and compute follow the real batch shapes (without
    either, rows are packed ``seq_len`` tokens). ``estimate``: no weights load, costs come from the config
    (``estimate.py``). ``threads``: compute threads (every core, as a lone party, when None).
    """
    from ..device import resolve_device
    from ..threads import available_cores

    say = progress or (lambda what: None)
    if batch < 1 or seq_len < 2:
        raise PlanError(f"the planner needs a batch of at least 1 row and 2 tokens, got batch={batch}, seq_len={seq_len}")
    run = base_config(model, batch, seq_len, dtype, device, data, cfg)
    say(f"reading {model}")
    if estimate and model.startswith("tiny:"):  # its config alone: a tiny model's weights are written on first use
        from ..models.tiny import parse_tiny, tiny_config

        source, config = None, tiny_config(*parse_tiny(model))
    else:
        source = resolve_model(model)
        config = source.config()
    spec = detect_arch(config)
    if spec.n_blocks < 3:
        raise PlanError(f"{model} has {spec.n_blocks} block(s); the planner profiles a U-shaped client and needs at least 3")
    sizes = model_sizes(config, spec, run.lora)
    uses_data = data is not None or (cfg is not None and cfg.data.source != RunConfig().data.source)
    if uses_data:
        say(f"drawing {steps} batches of {run.data.source}")
    batches, eval_tokens = data_batches(run, steps) if uses_data else ([], batch * seq_len)  # none: packed rows
    threads = threads or available_cores()
    dev = resolve_device(run.train.device)
    notes = []
    if dev.type == "cpu":
        say("measuring a party process's baseline memory")
        runtime = runtime_bytes(_yaml(run) if uses_data else None)
    else:  # what torch allocates on the accelerator (the bench's ``device_bytes``); the host process is apart
        runtime = {"server": 0, "client": 0, "client_peak": 0}
        notes.append(f"memory is {dev.type} memory as torch allocates it; the host process holds its own besides")
    common = dict(model=model, sizes=sizes, batch=batch, seq_len=seq_len, dtype=dtype, device=str(dev), threads=threads,
                  runtime_server=runtime["server"], runtime_client=runtime["client"], runtime_client_peak=runtime["client_peak"],
                  batches=batches, eval_tokens=eval_tokens, lazy_embeddings=_lazy_embeddings(source, spec, dtype, dev), notes=notes)
    if estimate:
        say("calibrating this machine's matrix throughput")
        return estimate_profile(run, dev, **common)
    modes = tuple(sorted({"full" if m == "full" else "lora" for m in run.segments.model_dump().values()}))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # measured at the width the run's batches have (padded data is narrower than seq_len): costs are linear
        # in tokens only roughly, and least wrong near the sizes that will run
        width = int(statistics.median(b.width for b in batches)) if batches else seq_len
        measured = {m: _measure(run, source, spec, config, dev, m, reps, width, say) for m in modes}
    finally:
        torch.set_num_threads(before)
    first = measured[modes[0]]
    return Profile(modes=modes, block_fwd={m: r["block_fwd"] for m, r in measured.items()},
                   block_bwd={m: r["block_bwd"] for m, r in measured.items()}, segment_fwd=first["segment_fwd"],
                   head_fwd=first["head_fwd"], head_bwd=first["head_bwd"], optimizer_s=first["optimizer_s"],
                   block_saved={m: r["block_saved"] for m, r in measured.items()}, shared_saved=first["shared_saved"],
                   head_peak=first["head_peak"], block_peak=first["block_peak"], eval_peak=first["eval_peak"],
                   trainable_itemsize=first["trainable_itemsize"], engine_factor=first["engine_factor"], **common)


def _lazy_embeddings(source, spec, dtype: str, device) -> bool:
    """Whether a party on the CPU keeps only the embedding rows it looks up: a weight loaded in the checkpoint's
    own dtype stays a view of the mapped file, whose pages become resident only when read (a head reads every
    row; a lookup a few)."""
    if source is None or device.type != "cpu" or not spec.pre:
        return False
    from safetensors import safe_open

    name, filename = next(iter(source.weight_map().items()))  # a checkpoint keeps one dtype
    with safe_open(str(source.weight_file(filename)), "pt") as f:
        return f.get_slice(name).get_dtype() == {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]


def _yaml(cfg: RunConfig) -> str:
    from ..config import dump_config

    return dump_config(cfg)


# -- measuring ---------------------------------------------------------------------------------------------
def _party(run: RunConfig, source, spec, config, device, mode: str):
    """A U-shaped client party holding blocks 0, 1 and the last (0 and the last on a 3-block model)."""
    from ..parties.party import Party, SessionSpec

    n = spec.n_blocks
    cuts = [2, n - 1] if n >= 4 else [1, 2]
    cfg = run.model_copy(update={"cuts": cuts, "mode": "split", "segments": run.segments.model_copy(
        update={"bottom": mode, "trunk": mode, "top": mode})})
    session = SessionSpec.from_run(cfg, source.fingerprint(), spec.model_type)
    return Party("client", source, spec, session, config, device=device), cuts


class _Marks:
    """Times (and profiler marks) at block boundaries, the phase autograd saves tensors in, and what it saved."""

    def __init__(self, party, loaded: list[int], last: int, profiler: bool):
        self.t: dict[str, float] = {}
        self.phase = "segment"
        self.saved: dict[str, int] = {}
        self._seen: set[int] = set()
        self._weights = {p.untyped_storage().data_ptr() for p in party.model.parameters()}
        self._weights |= {b.untyped_storage().data_ptr() for b in party.model.buffers()}
        self.profiler = profiler
        self.handles = []
        for i in loaded:
            block = party.blocks[i]
            self.handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self.handles.append(block.register_forward_hook(lambda m, a, out, i=i: self._leave(i, out, i == last)))

    def mark(self, name: str) -> None:
        self.t[name] = time.perf_counter()
        if self.profiler:
            with torch.profiler.record_function(f"plan:{name}"):
                pass

    def _enter(self, i: int) -> None:
        self.mark(f"pre{i}")
        self.phase = f"block{i}"

    def _leave(self, i: int, out, last: bool) -> None:
        self.mark(f"post{i}")
        self.phase = "head" if last else "segment"
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g, i=i: self.mark(f"grad{i}"))

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen and key not in self._weights:
            self._seen.add(key)
            self.saved[self.phase] = self.saved.get(self.phase, 0) + storage.nbytes()
        return t

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _step(party, cuts: list[int], rows: int, seq: int, vocab: int, device, marks: _Marks) -> dict[str, float]:
    """One training micro-batch through the U-shaped client party, timed at every boundary."""
    n = party.spec.n_blocks
    gen = torch.Generator().manual_seed(rows * 7919 + seq)
    ids = torch.randint(3, vocab, (rows, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.autograd.graph.saved_tensors_hooks(marks.pack, lambda t: t):
        sync(); marks.mark("start")
        h = party.run(0, cuts[0], input_ids=ids, attention_mask=mask).hidden
        sync(); marks.mark("bottom")
        x = h.detach().requires_grad_(True)
        x.register_hook(lambda g: marks.mark("grad_x"))
        marks.mark("top")
        out = party.run(cuts[1], n, hidden=x, attention_mask=mask, labels=ids, num_items_in_batch=rows * (seq - 1))
        sync(); marks.mark("backward")
    out.loss.backward()
    sync(); marks.mark("bottom_backward")
    if h.requires_grad:
        h.backward(x.grad)
    sync(); marks.mark("optimizer")
    party.optimizer_step(party.sq_grad_norm())
    sync(); marks.mark("end")
    t = marks.t
    bottom_blocks = [t[f"post{i}"] - t[f"pre{i}"] for i in range(cuts[0])]
    last = n - 1
    block_fwd = statistics.mean(bottom_blocks + [t[f"post{last}"] - t[f"pre{last}"]])
    segment = (t["bottom"] - t["start"]) - sum(bottom_blocks)
    bwd = [t["grad_x"] - t[f"grad{last}"]]
    if cuts[0] >= 2 and "grad0" in t and "grad1" in t:
        bwd.append(t["grad0"] - t["grad1"])
    return {"block_fwd": block_fwd, "segment_fwd": segment,
            "head_fwd": max((t["backward"] - t["top"]) - segment - (t[f"post{last}"] - t[f"pre{last}"]), 0.0),
            "head_bwd": t[f"grad{last}"] - t["backward"], "block_bwd": statistics.mean(bwd),
            "optimizer": t["end"] - t["optimizer"], "total": t["end"] - t["start"]}


def _memory(party, cuts, rows, seq, vocab, device) -> dict[str, float]:
    """One micro-batch under the profiler: saved bytes per phase, and the backward high-water marks."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # the profiler's library prints start/stop lines otherwise
    from torch.profiler import ProfilerActivity, profile

    n = party.spec.n_blocks
    loaded = [i for i in range(n) if i < cuts[0] or i >= cuts[1]]
    marks = _Marks(party, loaded, n - 1, profiler=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities, profile_memory=True) as prof:
            _step(party, cuts, rows, seq, vocab, device, marks)
            ids = torch.randint(3, vocab, (rows, seq)).to(device)
            with torch.no_grad():  # an evaluation batch through the top and head
                h = torch.zeros((rows, seq, party.model.config.get_text_config().hidden_size), dtype=party.dtype, device=device)
                marks.mark("eval")
                party.run(cuts[1], n, hidden=h, attention_mask=torch.ones_like(ids), labels=ids)
                marks.mark("eval_end")
    finally:
        marks.close()
    saved = marks.saved
    per_block = saved.get("block1", 0) if cuts[0] >= 2 else saved.get("block0", 0)
    firsts = [saved.get("block0", 0), saved.get(f"block{n - 1}", 0)]
    shared = max(statistics.mean(firsts) - per_block, 0) + saved.get("segment", 0) / 2
    curve = _live_curve(prof, device)
    t = {name: _mark_time(prof, name) for name in ("post%d" % (n - 1), "grad%d" % (n - 1), "grad_x", "grad1", "grad0", "eval", "eval_end")}
    head_peak = _excess(curve, t[f"post{n - 1}"], t[f"grad{n - 1}"]) if curve else 2.0 * saved.get("head", 0)
    block_peak = max(_excess(curve, t[f"grad{n - 1}"], t["grad_x"]), _excess(curve, t["grad1"], t["grad0"])) if curve else per_block
    return {"block_saved": per_block, "shared_saved": shared, "head_peak": max(head_peak, saved.get("head", 0)),
            "block_peak": block_peak, "eval_peak": _excess(curve, t["eval"], t["eval_end"]) if curve else head_peak}


def _live_curve(prof, device) -> list[tuple[int, int]]:
    """(time, live bytes) after every allocation and free on ``device``, from the profiler's memory events."""
    kind = "CUDA" if device.type == "cuda" else "CPU"
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and kind in str(e.device_type()))
    live, curve = 0, []
    for at, nbytes in events:
        live += nbytes
        curve.append((at, live))
    return curve


def _mark_time(prof, name: str) -> int | None:
    for e in prof.profiler.kineto_results.events():
        if e.name() == f"plan:{name}":
            return e.start_ns()
    return None


def _excess(curve: list[tuple[int, int]], start: int | None, end: int | None) -> float:
    """How far live memory rose above its level at ``start`` before ``end``."""
    if start is None or end is None or not curve:
        return 0.0
    base = next((live for at, live in reversed(curve) if at <= start), 0)
    inside = [live for at, live in curve if start <= at <= end]
    return float(max(max(inside, default=base) - base, 0))


def _measure(run: RunConfig, source, spec, config, device, mode: str, reps: int, seq: int, say) -> dict:
    say(f"loading blocks 0, 1 and {spec.n_blocks - 1} of {run.model} ({mode})")
    party, cuts = _party(run, source, spec, config, device, mode)
    vocab = config.get_text_config().vocab_size
    batch = run.train.batch_size
    sizes = [(1, seq), (batch, seq)] if batch > 1 else [(1, max(seq // 2, 2)), (1, seq)]
    n = spec.n_blocks
    loaded = [i for i in range(n) if i < cuts[0] or i >= cuts[1]]
    samples: dict[tuple[int, int], list[dict]] = {s: [] for s in sizes}
    whole: dict[str, list[float]] = {"main": [], "engine": []}

    def timed(rows: int, length: int) -> dict:
        marks = _Marks(party, loaded, n - 1, profiler=False)
        try:
            return _step(party, cuts, rows, length, vocab, device, marks)
        finally:
            marks.close()

    # a server computes on its engine's worker thread, which runs the same work measurably slower than a
    # process's main thread (by ~30% on this project's 2-core CPU machine): the largest micro-batch is timed there too
    with ThreadPoolExecutor(1, thread_name_prefix="splittune-plan") as engine:
        engine.submit(torch.set_num_threads, torch.get_num_threads()).result()
        for rep in range(reps + 1):  # the first round warms up
            say(f"timing blocks ({mode}): round {rep + 1} of {reps + 1}")
            for rows, length in sizes:
                result = timed(rows, length)
                if rep:
                    samples[(rows, length)].append(result)
            on_engine = engine.submit(timed, *sizes[-1]).result()
            if rep:
                whole["main"].append(samples[sizes[-1]][-1]["total"])
                whole["engine"].append(on_engine["total"])
    say(f"measuring activation memory ({mode})")
    memory = {s: _memory(party, cuts, *s, vocab, device) for s in sizes}
    trainable = party.params
    out: dict = {"trainable_itemsize": trainable[0].element_size() if trainable else 4}
    lo, hi = sizes
    tokens = {s: s[0] * s[1] for s in sizes}
    for key in ("block_fwd", "block_bwd", "segment_fwd", "head_fwd", "head_bwd"):
        med = {s: statistics.median(r[key] for r in samples[s]) for s in sizes}
        out[key] = Fit.through((tokens[lo], med[lo]), (tokens[hi], med[hi]))
    for key in ("block_saved", "shared_saved", "head_peak", "block_peak", "eval_peak"):
        out[key] = Fit.through((tokens[lo], memory[lo][key]), (tokens[hi], memory[hi][key]))
    opt = statistics.median(r["optimizer"] for s in sizes for r in samples[s])
    out["optimizer_s"] = opt / max(party.trainable_params, 1)
    out["engine_factor"] = statistics.median(whole["engine"]) / statistics.median(whole["main"])
    return out
