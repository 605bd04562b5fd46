"""``splittune verify``: the exactness contract as a command.

The split model and the unsplit model (same weights, same adapters, same seed) take the same batch:
their losses, every trainable gradient and the adapters after one optimizer step must agree. This
is what a user runs after pointing splittune at a new architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cut import CutLink, terms_from
from .config import RunConfig
from .device import resolve_device
from .models.arch import check_seq_len, detect_arch
from .models.zoo import resolve_model
from .parties import Client, Party, SessionSpec
from .engines.local import in_process, server_for


@dataclass
class VerifyReport:
    model: str
    cuts: list[int]
    shape: str
    loss_split: float
    loss_unsplit: float
    max_grad_diff: float
    max_update_diff: float
    worst_grad: str
    tensors: int
    tolerance: float
    bytes_up: int = 0
    bytes_down: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def loss_diff(self) -> float:
        return abs(self.loss_split - self.loss_unsplit)

    @property
    def ok(self) -> bool:
        return not self.problems and max(self.loss_diff, self.max_grad_diff, self.max_update_diff) <= self.tolerance


def make_batch(vocab: int, batch: int, seq: int, padding: bool, seed: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; with ``padding``, one row is left-padded and one right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding:
        pad = max(1, seq // 3)
        mask[0, :pad] = 0
        if batch > 1:
            mask[1, seq - pad :] = 0
        ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _grads(*parties: Party) -> dict[str, torch.Tensor]:
    from .models.adapters import trainable

    out = {}
    for party in parties:
        for name, p in trainable(party.model):
            out[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name in a:
        d = (a[name].float() - b[name].float()).abs().max().item() if a[name].numel() else 0.0
        if d > worst or not where:
            worst, where = d, name
    return worst, where


def verify(cfg: RunConfig, batch: int = 2, seq: int = 16, padding: bool = True, tolerance: float = 1e-5) -> VerifyReport:
    source = resolve_model(cfg.model)
    config = source.config()
    spec = detect_arch(config)
    check_seq_len(spec, seq, key="--seq", model=cfg.model)
    fingerprint = source.fingerprint()
    cfg = cfg.model_copy(update={"mode": "split"}).resolve(spec.n_blocks)  # the unsplit reference keeps the same segments
    split = SessionSpec.from_run(cfg, fingerprint, spec.model_type)
    whole = SessionSpec.from_run(cfg.model_copy(update={"mode": "centralized"}), fingerprint, spec.model_type)

    device = resolve_device(cfg.train.device)  # --set train.device=cuda checks the split on a GPU
    # the same micro-batches: a router loss (MoE) is computed per forward, as under transformers' gradient accumulation
    reference = Client(Party("client", source, spec, whole, config, device=device), micro_batches=cfg.train.micro_batches)
    server = server_for(source, spec, config, device=device)
    # the run's own chain: padding removal and codecs are part of what is verified
    link = CutLink(in_process(server)(), "verify", terms_from(cfg.codec.model_dump(), cfg.padding_removal))
    client = Client(Party("client", source, spec, split, config, device=device), link, cfg.train.micro_batches, cfg.train.max_in_flight)
    client.connect()

    vocab = config.get_text_config().vocab_size
    data = make_batch(vocab, batch, seq, padding, cfg.seed)
    half = max(1, batch // 2)
    micro = [data] if batch == 1 else [{k: v[:half] for k, v in data.items()}, {k: v[half:] for k, v in data.items()}]

    # the same random draws for both (a model that samples in training, e.g. phimoe's routing, draws them in the
    # same order split and unsplit; dropout is off unless train.model_dropout asks for it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        loss_ref, _ = reference.backward(1, micro)
        torch.manual_seed(cfg.seed)
        loss_split, _ = client.backward(1, micro)
    g_ref, g_split = _grads(reference.party), _grads(client.party, server.party)
    problems = []
    if set(g_ref) != set(g_split):
        problems.append(f"trainable tensors differ: only unsplit {sorted(set(g_ref) - set(g_split))[:3]}, "
                        f"only split {sorted(set(g_split) - set(g_ref))[:3]}")
    common = {k: g_ref[k] for k in g_ref if k in g_split}
    grad_diff, worst = _max_diff(common, g_split)
    if not g_ref:
        problems.append("nothing is trainable: check segments and lora settings")
    reference.optimizer_step(1)
    client.optimizer_step(1)
    after_ref = reference.party.state()
    after_split = {**client.party.state(), **client.server_state()}
    update_diff, _ = _max_diff({k: after_ref[k] for k in after_ref if k in after_split}, after_split)
    link.close()
    server.close()
    return VerifyReport(
        cfg.model, list(cfg.cuts), client.plan.shape, loss_split, loss_ref, grad_diff, update_diff, worst, len(g_ref),
        tolerance, link.bytes_up, link.bytes_down, problems,
    )
