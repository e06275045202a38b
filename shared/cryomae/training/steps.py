"""The parts every training loop shares: the learning-rate schedule, the optimizer, progress and cancelling.

Used by a project's training (``cryomae.training.train``) and the facility encoder's pre-training
(``cryomae.training.encoder``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import structlog
import torch

from cryomae.errors import TransientError

log = structlog.get_logger("cryomae.train")

#: Called about every 10 % of a stage with (stage, step, total steps, running means of the losses).
ProgressHook = Callable[[str, int, int, dict[str, float]], None]


class TrainingInterruptedError(TransientError):
    """Training stopped at a step boundary because its ``cancel`` event was set (the service is stopping).

    Transient: the training request goes back to its queue and is trained again from the start.
    """


def lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 5 % of the base rate."""
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


class Progress:
    """Progress log lines about every 10 % of a stage, with the running mean of each loss."""

    def __init__(
        self, stage: str, total: int, hook: ProgressHook | None = None, cancel: threading.Event | None = None
    ) -> None:
        self.stage, self.total, self.t0, self.hook = stage, total, time.perf_counter(), hook
        self.cancel = cancel
        self.every = max(1, total // 10)
        self.sums: dict[str, float] = {}
        self.count = 0

    def step(self, i: int, **losses: float) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise TrainingInterruptedError(f"training interrupted at {self.stage} step {i + 1}/{self.total}")
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if (i + 1) % self.every == 0 or i + 1 == self.total:
            means = {k: round(v / self.count, 5) for k, v in self.sums.items()}
            log.info(self.stage, step=i + 1, of=self.total, seconds=round(time.perf_counter() - self.t0, 1), **means)
            if self.hook is not None:
                self.hook(self.stage, i + 1, self.total, means)
            self.sums, self.count = {}, 0


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "token" in n]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
