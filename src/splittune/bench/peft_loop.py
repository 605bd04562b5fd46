"""The bench's ``peft`` entry: what a user who skips splittune would write, timed beside our entries.

A plain loop: transformers loads the model, peft's ``get_peft_model`` puts LoRA on it (the same rank, alpha and
target modules a run uses), and each step is ``model(**batch).loss.backward()``, ``clip_grad_norm_``, AdamW and the
same learning-rate schedule, on the very batches every other entry reads. No splittune code runs inside its step,
so ``centralized / peft`` says what our own centralized mode costs beyond the libraries, and every ratio we publish
can be read against it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import RunConfig
from ..data import merge_tasks
from ..models.adapters import default_targets, quiet_peft
from ..models.arch import detect_arch
from ..models.partition import DTYPES
from ..models.zoo import ModelSource
from ..run import client_tasks, train_batch


@dataclass
class PeftTimed:
    """The ``peft`` entry while it is timed; the same interface as ``measure.Timed``."""

    entry: Any
    cfg: RunConfig
    model: Any
    optimizer: Any
    scheduler: Any
    tasks: list
    samplers: list
    step: int = 0
    rounds: list[dict] = field(default_factory=list)
    server: None = None

    @classmethod
    def build(cls, entry: Any, cfg: RunConfig, source: ModelSource, threads: int) -> "PeftTimed":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, get_scheduler

        t, lora = cfg.train, cfg.lora
        model = AutoModelForCausalLM.from_pretrained(str(source.path) if source.path else source.repo_id, dtype=DTYPES[t.dtype])
        model.config.use_cache = False
        for m in model.modules():  # as a run: the model's own dropout off (train.model_dropout is off by default)
            if isinstance(m, torch.nn.Dropout) and not t.model_dropout:
                m.p = 0.0
        targets = lora.target_modules or default_targets(detect_arch(model.config))
        with quiet_peft():
            model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=targets, bias="none"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        scheduler = get_scheduler(t.schedule, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)
        tasks = client_tasks(cfg, source.tokenizer())
        samplers = [iter(task.sampler(t.batch_size, cfg.seed)) for task in tasks]
        return cls(entry, cfg, model, optimizer, scheduler, tasks, samplers)

    def round(self) -> dict[str, Any]:
        """One step on the next batch, as a transformers + peft loop takes it."""
        t = self.cfg.train
        batches = [train_batch(self.tasks[0], next(self.samplers[0])) for _ in range(t.grad_accum)]
        t0 = time.perf_counter()
        loss_sum = 0.0
        for b in batches:
            loss = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss / len(batches)
            loss.backward()
            loss_sum += float(loss)
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        round_s = time.perf_counter() - t0
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        row = {"round_s": round_s, "tokens": tokens, "loss_tokens": sum(int((b["labels"] != -100).sum()) for b in batches),
               "loss": loss_sum, "bytes_up": 0, "bytes_down": 0}
        self.rounds.append(row)
        return row

    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss on the held-out examples (no accuracy: that is our evaluation's, not a loop's)."""
        pooled = merge_tasks(self.tasks) if len(self.tasks) > 1 else self.tasks[0]
        size, total, count = self.cfg.train.batch_size, 0.0, 0
        batches = range(0, len(pooled.eval), size)
        if self.cfg.train.eval_batches is not None:
            batches = batches[: self.cfg.train.eval_batches]
        self.model.eval()
        with torch.no_grad():
            for start in batches:
                b = pooled.collate(pooled.eval[start:start + size])
                n = int((b["labels"][:, 1:] != -100).sum())
                total += float(self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss) * n
                count += n
        self.model.train()
        loss = total / max(count, 1)
        return {"loss": loss, "ppl": float(torch.tensor(min(loss, 50.0)).exp())}

    def close(self) -> None:
        self.model = self.optimizer = None
