"""What one choice costs: a step's time, each party's peak memory and the bytes each way, from a profile.

Compute comes from the profile's per-block, prologue and head costs (``profile.py``), the bytes and codec
time from the real chain (``traffic.py``), the timeline from the client's own pipelining order and the
emulated link's arithmetic (``pipeline.py``). Memory is what a party process holds at its peak: its runtime
(an empty party process), its weights, its trainable state (parameters, gradients and AdamW's two moments)
and its activations: what autograd keeps for every micro-batch in flight, plus the high-water mark of the
work under way (the head's backward, or a block's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..channels.emulated import LinkModel
from ..config import LinkConfig, RunConfig
from ..models.packed_head import ROWS
from ..models.quantize import CHUNK, FOUR_BIT
from ..models.partition import plan_split
from ..wire.codecs import make_codec_with_feedback
from .batches import Micro, full_batches, split
from .pipeline import Hop, simulate
from .profile import Profile
from .sizes import ModelSizes
from .traffic import codec_key, step_trip, trips


@dataclass
class Prediction:
    step_s: float
    client_peak_bytes: int
    server_peak_bytes: int
    bytes_up: float  # per training step (its messages: activations, gradients, the step's norm)
    bytes_down: float
    client_s: float  # the client's compute and codec work in a step
    server_s: float  # the server's
    transfer_s: float  # time the step's frames spend crossing the link (bytes over bandwidth, plus latency each)
    client_memory: dict[str, int]  # runtime, weights, optimizer, activations
    server_memory: dict[str, int]
    shape: str
    cuts: list[int]
    client_blocks: int  # blocks before the first cut: how deep the client's private text goes before it leaves
    lossy: list[str] = field(default_factory=list)  # the directions whose codec is lossy
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def lossy_directions(cfg: RunConfig) -> list[str]:
    out = []
    for direction in ("up", "down"):
        spec = getattr(cfg.codec, direction)
        roles = spec.values() if isinstance(spec, dict) and "name" not in spec else [spec]
        if any(make_codec_with_feedback(s)[0].lossy for s in roles):
            out.append(direction)
    return out


def link_of(cfg: RunConfig, bandwidth_mbps: float | None, latency_ms: float) -> LinkModel | None:
    """The link a step crosses: the given bandwidth and latency, else the config's emulated link, else none."""
    if bandwidth_mbps is not None or latency_ms:
        return LinkModel.of(LinkConfig(bandwidth_mbps=bandwidth_mbps, latency_ms=latency_ms))
    return LinkModel.of(cfg.link) if cfg.link.active else None


def _fresh(link: LinkModel | None) -> LinkModel | None:
    return None if link is None else LinkModel(dict(link.rate), link.latency)


def _crossing_s(link: LinkModel | None, direction: str, nbytes: int) -> float:
    """One frame alone on the link: its bytes over the rate, plus the latency (``link`` is a scratch model)."""
    if link is None:
        return 0.0
    link.free_at[direction] = 0.0
    return link.deliver(direction, 0.0, nbytes)


class _Costs:
    """A profile's costs for one party's segments (``speed``: how many times faster than the profile)."""

    def __init__(self, profile: Profile, speed: float):
        self.p, self.speed = profile, speed

    def fwd(self, mode: str, blocks: int, tokens: int, head: bool = False) -> float:
        p = self.p
        t = p.segment_fwd(tokens) + blocks * p.block_fwd[p.mode(mode)](tokens) + (p.head_fwd(tokens) if head else 0.0)
        return t / self.speed

    def bwd(self, mode: str, blocks: int, tokens: int, head: bool = False, recompute: bool = False) -> float:
        p, m = self.p, self.p.mode(mode)
        t = blocks * p.block_bwd[m](tokens) + (p.head_bwd(tokens) if head else 0.0)
        if recompute:
            t += blocks * p.block_fwd[m](tokens)
        return t / self.speed


def step_micros(cfg: RunConfig, profile: Profile) -> list[list[Micro]]:
    """The micro-batches of each step the prediction covers (at most the profile's drawn batches)."""
    t = cfg.train
    if profile.batches:
        if t.batch_size != profile.batch:
            raise ValueError(f"the profile drew batches of {profile.batch} rows; this config's train.batch_size is "
                             f"{t.batch_size}: profile again with batch={t.batch_size}")
        batches = profile.batches
    else:
        batches = full_batches(t.batch_size, t.seq_len)
    steps = max(1, min(t.steps, len(batches) // t.grad_accum)) if len(batches) > 1 else 1
    out = []
    for s in range(steps):
        drawn = [batches[(s * t.grad_accum + j) % len(batches)] for j in range(t.grad_accum)]
        out.append([m for b in drawn for m in split(b, t.micro_batches)])
    return out


def predict(cfg: RunConfig, profile: Profile, bandwidth_mbps: float | None = None, latency_ms: float = 0.0,
            server_profile: Profile | None = None, server_speed: float = 1.0) -> Prediction:
    """Predict ``cfg`` (any RunConfig; ``cuts: auto`` is resolved) from ``profile`` on the link given (else the
    config's ``link:``). The server computes as ``server_profile`` says (the same machine when None), and
    ``server_speed`` times faster still. Each party computes on its own cores: in one process, the runner
    gives each half of them when they compute at once (``train.threads: auto``), which came out close to this
    (SmolLM2 on 2 cores, 4 micro-batches: measured 9% faster than predicted)."""
    p = profile
    n = p.sizes.n_blocks
    cfg = cfg.resolve(n)
    centralized = cfg.mode != "split"
    plan = plan_split(n, [] if centralized else cfg.cuts, "centralized" if centralized else "split")
    shape = plan.shape
    notes = list(p.notes)
    if cfg.segments.bottom == "frozen" and getattr(getattr(cfg, "cache", None), "max_bytes", 0):
        notes.append("a frozen bottom's activations are cached by the server after the first epoch: less crosses then")
    if cfg.clients > 1:
        notes.append(f"predicted for one client; {cfg.clients} clients share the server's time")
    t = cfg.train
    client_ckpt = bool(getattr(t, "gradient_checkpointing", False))
    server_ckpt = bool(getattr(t, "server_gradient_checkpointing", False))
    modes = cfg.segments
    named = modes.model_dump()
    sp = server_profile or p
    client, server = _Costs(p, 1.0), _Costs(sp, server_speed / sp.engine_factor)
    link = link_of(cfg, bandwidth_mbps, latency_ms)
    scratch = _fresh(link)
    steps = step_micros(cfg, p)
    width, item = p.sizes.width, p.act_itemsize
    a = plan.segment("bottom").end
    bottom_trains = modes.bottom == "full" or (modes.bottom == "lora" and a > 0)
    codec = codec_key(cfg.codec.model_dump())
    totals = {"step": 0.0, "up": 0.0, "down": 0.0, "client": 0.0, "server": 0.0, "wire": 0.0}
    for micros in steps:
        num_items = sum(m.kept - m.rows for m in micros)  # labels after the shift (right-padded rows)
        if centralized:
            busy = sum(client.fwd(modes.trunk, n, m.tokens, head=True) + client.bwd(modes.trunk, n, m.tokens, head=True,
                                                                                recompute=client_ckpt) for m in micros)
            busy += p.optimizer_s * _trainable(named, p, plan, "client")
            totals["step"] += busy
            totals["client"] += busy
            continue
        hops_of = []
        for m in micros:
            crossings = trips(codec, cfg.padding_removal, shape, m, width, t.dtype, bottom_trains, num_items)
            hops_of.append(_hops(shape, plan, modes, m.tokens, crossings, client, server, bottom_trains, client_ckpt, server_ckpt))
            for c in crossings:
                totals["up"] += c.up
                totals["down"] += c.down
                totals["wire"] += _crossing_s(scratch, "up", c.up) + _crossing_s(scratch, "down", c.down)
        st = step_trip(codec, cfg.padding_removal)
        server_opt = sp.optimizer_s * _trainable(named, p, plan, "server") / server.speed
        client_opt = p.optimizer_s * _trainable(named, p, plan, "client")
        step = Hop(st.encode_s, st.up, st.server_s + server_opt, st.down, st.decode_s + client_opt)
        totals["up"] += st.up
        totals["down"] += st.down
        totals["wire"] += _crossing_s(scratch, "up", st.up) + _crossing_s(scratch, "down", st.down)
        in_flight = min(t.max_in_flight or len(micros), len(micros))
        client_s = sum(h.before_s + h.after_s for hops in hops_of for h in hops) + step.before_s + step.after_s
        server_s = sum(h.server_s for hops in hops_of for h in hops) + step.server_s
        totals["step"] += simulate(hops_of, step, in_flight, _fresh(link))
        totals["client"] += client_s
        totals["server"] += server_s
    k = len(steps)
    biggest = max((m for micros in steps for m in micros), key=lambda m: m.tokens)
    in_flight = min(t.max_in_flight or len(steps[0]), len(steps[0]))
    cmem, smem = _memory(cfg, named, p, server_profile or p, plan, biggest, in_flight, bottom_trains, client_ckpt, server_ckpt, width, item)
    return Prediction(
        step_s=totals["step"] / k, client_peak_bytes=sum(cmem.values()), server_peak_bytes=sum(smem.values()),
        bytes_up=totals["up"] / k, bytes_down=totals["down"] / k, client_s=totals["client"] / k,
        server_s=totals["server"] / k, transfer_s=totals["wire"] / k, client_memory=cmem, server_memory=smem,
        shape=shape, cuts=list(plan.cuts), client_blocks=a if not centralized else n,
        lossy=[] if centralized else lossy_directions(cfg), notes=notes)


def _hops(shape, plan, modes, tokens, crossings, client: _Costs, server: _Costs, bottom_trains, client_ckpt, server_ckpt):
    bottom, trunk = plan.segment("bottom"), plan.segment("trunk")
    a, mid = bottom.end, len(trunk.blocks)
    back = client.bwd(modes.bottom, a, tokens, recompute=client_ckpt) if bottom_trains else 0.0
    first = crossings[0]
    if shape == "two-part":
        job = server.fwd(modes.trunk, mid, tokens, head=True) + server.bwd(modes.trunk, mid, tokens, head=True, recompute=server_ckpt)
        return [Hop(client.fwd(modes.bottom, a, tokens) + first.encode_s, first.up, first.server_s + job, first.down,
                    first.decode_s + back)]
    top = len(plan.segment("top").blocks)
    second = crossings[1]
    top_s = client.fwd(modes.top, top, tokens, head=True) + client.bwd(modes.top, top, tokens, head=True, recompute=client_ckpt)
    return [Hop(client.fwd(modes.bottom, a, tokens) + first.encode_s, first.up, first.server_s + server.fwd(modes.trunk, mid, tokens),
                first.down, first.decode_s + top_s),
            Hop(second.encode_s, second.up, second.server_s + server.bwd(modes.trunk, mid, tokens, recompute=server_ckpt),
                second.down, second.decode_s + back)]


def _trainable(modes: dict[str, str], p: Profile, plan, party: str) -> int:
    """Parameters ``party`` trains."""
    return sum(p.sizes.trainable(modes[s.name], len(s.blocks), s.embeds, s.head) for s in plan.party_segments(party))


def _weights(p: Profile, segments, modes: dict[str, str], quantize: dict | None = None) -> int:
    """The weights a party keeps resident (its blocks packed where ``quantize`` says). Embeddings read from the
    mapped checkpoint (``lazy_embeddings``) stay resident only where they are read: every row when they are the
    head too, a few rows otherwise."""
    s, q = p.sizes, quantize or {}
    pre = any(seg.embeds for seg in segments)
    post = any(seg.head for seg in segments)
    lookup_only = p.lazy_embeddings and not (post and s.tied_params) and modes.get("bottom") != "full"
    outer = (s.pre_params if pre and not lookup_only else 0) + ((s.post_params + (0 if pre else s.tied_params)) if post else 0)
    blocks = sum(len(seg.blocks) * s.block_bytes(p.act_itemsize, q.get(seg.name, "none"), q.get("double_quant", False))
                 for seg in segments)
    head = 0
    if post and q.get("head", "none") != "none" and not s.tied_params:  # the head packed as a block's linear layers are
        head = s.vocab * s.width
        packed = ModelSizes.block_bytes(replace(s, block_params=head, linear_params=head, linear_rows=s.vocab), p.act_itemsize,
                                        q["head"], q.get("double_quant", False))
        return blocks + (outer - head) * p.act_itemsize + packed
    return blocks + outer * p.act_itemsize


def _optimizer(modes: dict[str, str], p: Profile, plan, party: str) -> int:
    """Trainable parameters, their gradients and AdamW's two moments (a ``full`` segment's weights are counted
    with the weights already)."""
    total = 0
    for s in plan.party_segments(party):
        count = p.sizes.trainable(modes[s.name], len(s.blocks), s.embeds, s.head)
        total += count * (4 * p.trainable_itemsize if modes[s.name] == "lora" else 3 * p.act_itemsize)
    return total


def _memory(cfg, named: dict[str, str], p: Profile, sp: Profile, plan, micro: Micro, in_flight: int, bottom_trains, client_ckpt, server_ckpt,
            width: int, item: int) -> tuple[dict[str, int], dict[str, int]]:
    tok = micro.tokens
    act = tok * width * item  # one activation tensor at the cut
    crossed = (micro.kept if cfg.padding_removal else tok) * width * item  # its frame, about

    def blocks_kept(prof: Profile, mode: str, blocks: int, ckpt: bool) -> float:
        per = act if ckpt else prof.block_saved[prof.mode(mode)](tok)
        return prof.shared_saved(tok) + blocks * per

    def working(prof: Profile, mode: str, ckpt: bool) -> float:
        """A block's backward (and, recomputing, its own saved tensors again)."""
        return prof.block_peak(tok) + (prof.block_saved[prof.mode(mode)](tok) if ckpt else 0.0)

    modes = cfg.segments
    quantized = cfg.quantize.model_dump()
    n = p.sizes.n_blocks
    if plan.shape == "centralized":
        acts = blocks_kept(p, modes.trunk, n, client_ckpt) + max(p.head_peak(tok), working(p, modes.trunk, client_ckpt))
        client = {"runtime": p.runtime_client, "weights": _weights(p, plan.segments, named, quantized),
                  "optimizer": _optimizer(named, p, plan, "client"),
                  "activations": int(max(acts, p.eval_peak(p.eval_tokens)))}
        return _floor(client, p), {}
    a = plan.segment("bottom").end
    mid = len(plan.segment("trunk").blocks)
    held = (blocks_kept(p, modes.bottom, a, client_ckpt) if bottom_trains else 0.0) + act + crossed
    if plan.shape == "u-shape":
        held += crossed  # the server's reply waits, decoded when the client takes it
        top = len(plan.segment("top").blocks)
        now = blocks_kept(p, modes.top, top, client_ckpt) + max(p.head_peak(tok), working(p, modes.top, client_ckpt))
        pending = blocks_kept(sp, modes.trunk, mid, server_ckpt) + act + 2 * crossed
        server_acts = in_flight * pending + working(sp, modes.trunk, server_ckpt)
    else:
        now = working(p, modes.bottom, client_ckpt) if bottom_trains else 0.0
        server_acts = (blocks_kept(sp, modes.trunk, mid, server_ckpt) + max(sp.head_peak(tok), working(sp, modes.trunk, server_ckpt))
                       + in_flight * crossed)
    # an evaluation runs whole batches without gradients: the head's party peaks at its logits
    client_eval = p.eval_peak(p.eval_tokens) if plan.shape == "u-shape" else 0.0
    server_eval = sp.eval_peak(p.eval_tokens) if plan.shape == "two-part" else 0.0
    client_acts = _with_quantized(p, plan.party_segments("client"), quantized, max(in_flight * held + now, client_eval))
    server_acts = _with_quantized(sp, plan.party_segments("server"), quantized, max(server_acts, server_eval))
    client = {"runtime": p.runtime_client, "weights": _weights(p, plan.party_segments("client"), named, quantized),
              "optimizer": _optimizer(named, p, plan, "client"), "activations": int(client_acts)}
    server = {"runtime": sp.runtime_server, "weights": _weights(sp, plan.party_segments("server"), named, quantized),
              "optimizer": _optimizer(named, sp, plan, "server"), "activations": int(server_acts)}
    return _floor(client, p), server


def _with_quantized(p: Profile, segments, quantized: dict, acts: float) -> float:
    """A party's activation peak, or, when it quantizes, the larger of its loading and its step. Loading packs one
    layer at a time as it is read: the layer as read plus working copies (measured on the CPU: 4 bytes per weight
    and bitsandbytes' 14 per weight of one chunk for 4-bit; 18 per weight for LLM.int8, which packs a whole layer at
    once). A step adds one layer dequantized at a time."""
    s, item = p.sizes, p.act_itemsize
    head = quantized.get("head", "none")
    if any(seg.head for seg in segments) and head != "none" and not s.tied_params:
        # a 4-bit head is computed a slice of the vocabulary at a time (models/packed_head.py): one slice dequantized at
        # once, freed before the next; bitsandbytes' int8 layer dequantizes it whole for each product, in forward and
        # again in backward
        acts += ROWS * s.width * item if head in FOUR_BIT else 1.5 * s.vocab * s.width * item
    kinds = {quantized.get(seg.name, "none") for seg in segments if seg.blocks} - {"none"}
    if not kinds:
        return acts
    layer = s.ffn * s.width  # the largest linear layer of a block (the MLP's projections)
    four_bit = layer * (item + 4) + CHUNK * 14
    loading = max(layer * 18 if k == "int8" else four_bit for k in kinds)
    return max(acts + layer * item, loading)


def _floor(client: dict[str, int], p: Profile) -> dict[str, int]:
    """A client peaks at least where building its data did (``runtime_client_peak``): what is left over is
    counted as runtime."""
    short = p.runtime_client_peak - sum(client.values())
    if short > 0:
        client = {**client, "runtime": client["runtime"] + short}
    return client
