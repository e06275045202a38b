"""The parts every training loop shares: the learning-rate schedule, the optimizer, progress and cancelling.

Used by a project's training (``cryomae.training.train``) and the facility encoder's pre-training
(``cryomae.training.encoder``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog
import torch

from cryomae.config import stage_steps
from cryomae.device import autocast
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


@dataclass(frozen=True)
class TrainingLoop:
    """The one training loop of a stage: ``epochs`` passes over ``n`` items in a new random order each, in steps
    of ``per_step`` items, AdamW with the warm-up + cosine learning rate (``lr_at``), the loss under autocast,
    progress and cancelling at every step (``Progress``)."""

    stage: str
    epochs: int
    per_step: int
    lr: float
    weight_decay: float

    def run(
        self,
        model: torch.nn.Module,
        n: int,
        batch: Callable[[np.ndarray], torch.Tensor],
        loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
        rng: np.random.Generator,
        device: torch.device,
        on_progress: ProgressHook | None = None,
        cancel: threading.Event | None = None,
    ) -> list[dict[str, float]]:
        """Train; ``batch(indices)`` builds a step's input (outside autocast), ``loss(input)`` returns the loss to
        minimise and the figures to log. Returns each step's figures."""
        steps_per_epoch = math.ceil(n / self.per_step) if n else 0
        total = stage_steps(n, self.per_step, self.epochs)
        if total == 0:
            return []
        opt = adamw(model, self.lr, self.weight_decay)
        progress, history, step = Progress(self.stage, total, on_progress, cancel), [], 0
        model.train()
        for _ in range(self.epochs):
            order = rng.permutation(n)
            for b in range(steps_per_epoch):
                inputs = batch(order[b * self.per_step : (b + 1) * self.per_step])
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, self.lr)
                with autocast(device):
                    value, figures = loss(inputs)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                history.append(figures)
                progress.step(step, **figures)
                step += 1
        return history
