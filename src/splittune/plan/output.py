"""The plan as a config file (``--write-config``) and as JSON (``--json``)."""

from __future__ import annotations

from typing import Any

import yaml

from ..report.progress import human_bytes
from .profile import Profile
from .search import Ranked


def link_words(bandwidth_mbps: float | None, latency_ms: float) -> str:
    rate = "an unlimited link" if bandwidth_mbps is None else f"a {bandwidth_mbps:g} Mbps link"
    return f"{rate}, {latency_ms:g} ms one way"


def config_yaml(best: Ranked, profile: Profile, client_memory: int, server_memory: int | None,
                bandwidth_mbps: float | None, latency_ms: float) -> str:
    """The chosen settings on top of the base config's own (only keys that differ from the defaults, and the
    planned ones always), loadable by ``splittune train --config``.

    The link is written as a comment, not as ``link:`` keys: those emulate a slow link on top of the real one,
    which a run over the real network must not do (a run on one machine that should feel that network can
    add them)."""
    cfg, p = best.config, best.prediction
    tree: dict[str, Any] = cfg.model_dump(mode="json", exclude_defaults=True)
    planned = {"batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len, "micro_batches": cfg.train.micro_batches,
               "gradient_checkpointing": cfg.train.gradient_checkpointing}
    tree = {"model": cfg.model, "cuts": list(cfg.cuts), "codec": cfg.codec.model_dump(mode="json"),
            **{k: v for k, v in tree.items() if k not in ("model", "cuts", "codec")}}
    tree["train"] = {**tree.get("train", {}), **planned}
    lossy = f" (lossy: {', '.join(p.lossy)})" if p.lossy else ""
    rate = {} if bandwidth_mbps is None else {"bandwidth_mbps": bandwidth_mbps}
    emulate = yaml.safe_dump({"link": {**rate, "latency_ms": latency_ms}}, default_flow_style=True).strip()
    server = human_bytes(server_memory) if server_memory is not None else "unbounded"
    header = [
        f"splittune plan: the fastest choice for {profile.model} that fits a client of {human_bytes(client_memory)} "
        f"(server: {server}) on {link_words(bandwidth_mbps, latency_ms)}",
        f"{best.choice.describe()}{lossy}; the client keeps {p.client_blocks} block(s) before its first cut",
        f"predicted per step: {p.step_s:.3f} s (client {p.client_s:.3f} s, server {p.server_s:.3f} s, on the link "
        f"{p.transfer_s:.3f} s); client peak {human_bytes(p.client_peak_bytes)}, server peak {human_bytes(p.server_peak_bytes)}; "
        f"{human_bytes(p.bytes_up)} up, {human_bytes(p.bytes_down)} down",
        f"profile: {'estimated from the config' if profile.estimated else 'measured'} on {profile.device} "
        f"({profile.threads} threads), batch {profile.batch} x {profile.seq_len} tokens, {profile.dtype}",
        f"the link is the network's, not this file's; to emulate it on one machine add: {emulate}",
    ]
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(tree, sort_keys=False)


def plan_json(ranked: list[Ranked], profile: Profile, considered: int, notes: list[str]) -> dict[str, Any]:
    return {
        "model": profile.model, "profile": {k: getattr(profile, k) for k in ("batch", "seq_len", "dtype", "device", "threads",
                                                                               "estimated")},
        "considered": considered, "fit": len(ranked), "notes": notes,
        "choices": [{"cuts": list(r.choice.cuts), "shape": r.choice.shape, "codec": {"up": r.choice.up, "down": r.choice.down},
                     "micro_batches": r.choice.micro_batches, "gradient_checkpointing": r.choice.checkpointing,
                     "prediction": r.prediction.to_dict(), **_guard(r)} for r in ranked],
    }


def _guard(r: Ranked) -> dict[str, Any]:
    """--max-leak: the defense setting and what the leak table says of this choice."""
    if r.guard is None:
        return {}
    p = r.guard.point
    return {"defense": {"setting": p.setting, **p.overlay}, "leak": {"rouge_l_f1": p.leak, "upper_95": p.leak_hi, "texts": p.texts,
            "sure": r.guard.sure, "measured_at": {"cut": p.cut, "codec": p.codec}, "how": r.guard.how},
            "ppl_ratio": p.ppl_ratio, "epsilon": p.epsilon}
