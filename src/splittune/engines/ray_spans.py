"""The trunk's later spans as Ray actors (``ray.trunk_spans: S``): each holds the server's party for its blocks, on the
resources ``ray.server_resources`` asks for (its own GPU when the cluster has GPUs), and answers the trunk's actor as
``parties/server/spans.py``'s ``Span``. Tensors cross as safetensors bytes and settings as JSON: nothing pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .. import checkpoint


def _pack(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_tensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


class _SpanActor:
    """One later span: the server's party for blocks [start, end), its kept forwards awaiting their gradients."""

    def __init__(self, model: str, spec: str, start: int, end: int, adapters: list[str], total_steps: int, device: str,
                 threads: int):
        from ..device import resolve_device
        from ..models.arch import detect_arch
        from ..models.zoo import resolve_model
        from ..parties.party import Party, SessionSpec

        torch.set_num_threads(max(1, threads))
        source = resolve_model(model)
        config = source.config()
        self.start, self.end = start, end
        self.party = Party("server", source, detect_arch(config), SessionSpec(**json.loads(spec)), config,
                           adapters=tuple(adapters), total_steps=total_steps, device=resolve_device(device))
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, key: int | None, frame: bytes) -> bytes:
        got = load_tensors(frame)
        hidden, mask = got["hidden"].to(self.party.device), got["mask"].to(self.party.device)
        with torch.set_grad_enabled(key is not None):
            if key is not None:
                hidden.requires_grad_(True)
            out = self.party.run(self.start, self.end, hidden=hidden, attention_mask=mask, head=False).hidden
        if key is not None:
            self.pending[key] = (hidden, out)
        return _pack({"hidden": out})

    def backward(self, key: int, frame: bytes) -> bytes:
        hidden, out = self.pending.pop(key)
        out.backward(load_tensors(frame)["grad"].to(out.device))
        return _pack({"grad": hidden.grad})

    def sq_grad_norm(self, adapter: str) -> float:
        return self.party.sq_grad_norm(adapter)

    def optimizer_step(self, total_sq_norm: float, adapter: str, skip: bool) -> None:
        self.party.optimizer_step(total_sq_norm, adapter, skip)

    def catch_up(self, step: int, adapter: str) -> None:
        self.party.catch_up(step, adapter)

    def forget(self, adapter: str) -> None:
        self.pending.clear()
        optimizer = self.party.trainers[adapter].optimizer
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)

    def state(self, adapter: str) -> bytes:
        return _pack(self.party.state(adapter))

    def load_state(self, frame: bytes, adapter: str) -> None:
        self.party.load_state(load_tensors(frame), adapter)

    def checkpoint(self) -> tuple[bytes, str]:
        groups, meta = self.party.checkpoint()
        return _pack(checkpoint.pack(groups)), json.dumps(meta)

    def restore(self, frame: bytes, meta: str) -> None:
        self.party.restore(checkpoint.unpack(load_tensors(frame)), json.loads(meta))

    def holds(self, module: str) -> bool:
        return self.party.holds(module)

    def fold(self, module: str, frame: bytes) -> None:
        self.party.fold(module, load_tensors(frame)["delta"].to(self.party.device))

    def info(self) -> dict[str, int]:
        return {"trainable": self.party.trainable_params, "params": self.party.weights.params, "bytes": self.party.weights.bytes}


class RaySpan:
    """The trunk actor's handle on one span actor: ``spans.Span`` in plain tensors."""

    def __init__(self, actor: Any, start: int, end: int):
        self.actor, self.start, self.end = actor, start, end
        self._info: dict[str, int] | None = None

    def _get(self, ref):
        import ray

        return ray.get(ref)

    def forward(self, key, hidden, mask):
        out = load_tensors(self._get(self.actor.forward.remote(key, _pack({"hidden": hidden, "mask": mask}))))["hidden"]
        return out.to(hidden.device)

    def backward(self, key, grad):
        return load_tensors(self._get(self.actor.backward.remote(key, _pack({"grad": grad}))))["grad"].to(grad.device)

    def sq_grad_norm(self, adapter):
        return self._get(self.actor.sq_grad_norm.remote(adapter))

    def optimizer_step(self, total_sq_norm, adapter, skip):
        self._get(self.actor.optimizer_step.remote(total_sq_norm, adapter, skip))

    def catch_up(self, step, adapter):
        self._get(self.actor.catch_up.remote(step, adapter))

    def forget(self, adapter):
        self._get(self.actor.forget.remote(adapter))

    def state(self, adapter):
        return dict(load_tensors(self._get(self.actor.state.remote(adapter))))

    def load_state(self, tensors, adapter):
        self._get(self.actor.load_state.remote(_pack(tensors), adapter))

    def checkpoint(self):
        frame, meta = self._get(self.actor.checkpoint.remote())
        return checkpoint.unpack(dict(load_tensors(frame))), json.loads(meta)

    def restore(self, groups, meta):
        self._get(self.actor.restore.remote(_pack(checkpoint.pack(groups)), json.dumps(meta)))

    def holds(self, module):
        return self._get(self.actor.holds.remote(module))

    def fold(self, module, delta):
        self._get(self.actor.fold.remote(module, _pack({"delta": delta})))

    def info(self):
        if self._info is None:
            self._info = self._get(self.actor.info.remote())
        return self._info


class RaySpans:
    """``spans.SpanMaker`` on Ray: each later span an actor of ``resources`` ({num_cpus, num_gpus})."""

    def __init__(self, count: int, model: str, device: str, resources: dict[str, float]):
        self.count, self.model, self.device, self.resources = count, model, device, resources

    def make(self, spec, start: int, end: int, adapters: tuple[str, ...], total_steps: int) -> RaySpan:
        import ray

        cpus, gpus = float(self.resources.get("num_cpus", 1)), float(self.resources.get("num_gpus", 0))
        actor = ray.remote(_SpanActor).options(num_cpus=cpus, num_gpus=gpus).remote(
            self.model, json.dumps(asdict(spec)), start, end, list(adapters), total_steps, self.device, max(1, int(cpus)))
        span = RaySpan(actor, start, end)
        span.info()  # (waits until the span holds its blocks: a failure to place or load surfaces here)
        return span
