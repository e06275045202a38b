"""Words for people (cryomae.words): the time left and a training's progress as the status and the demo show them,
and the step counts the estimate rests on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryomae.config import TrainConfig
from cryomae.training.steps import TrainingLoop
from cryomae.words import time_left, training_progress


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-3, "about 5 s left"),
        (12, "about 10 s left"),
        (59, "about 1 min left"),
        (90, "about 2 min left"),
        (3540, "about 59 min left"),
        (3599, "about 1 h left"),
        (3600, "about 1 h left"),
        (4 * 3600 + 20 * 60, "about 4 h 20 min left"),
    ],
)
def test_time_left(seconds: float, text: str) -> None:
    assert time_left(seconds) == text


def test_training_progress_with_and_without_an_estimate() -> None:
    assert training_progress({"progress": "pretrain 96/320", "eta_s": 130.0}) == "pretrain 96/320, about 2 min left"
    assert training_progress({"progress": "pretrain 96/320"}) == "pretrain 96/320"
    assert training_progress({"state": "training"}) == ""


def test_planned_steps_are_the_steps_each_stage_runs() -> None:
    """The trainer's estimate counts the steps of both stages before they run: the counts the loop runs."""
    cfg = TrainConfig(
        preset="test",
        pretrain_regions=70,
        batch_size=16,
        pretrain_epochs=3,
        n_unlabeled=40,
        unlabeled_per_step=64,
        epochs=2,
    )
    assert cfg.planned_steps() == {"pretrain": 5 * 3, "scs_train": 1 * 2}
    model = torch.nn.Linear(2, 1)
    heard: list[tuple[int, int]] = []
    loop = TrainingLoop("pretrain", cfg.pretrain_epochs, cfg.batch_size, 1e-3, 0.0)
    loop.run(
        model,
        cfg.pretrain_regions,
        lambda idx: torch.ones(len(idx), 2),
        lambda x: ((model(x) ** 2).mean(), {"mse": 0.0}),
        np.random.default_rng(0),
        torch.device("cpu"),
        on_progress=lambda stage, step, total, losses: heard.append((step, total)),
    )
    assert heard[-1] == (cfg.planned_steps()["pretrain"], cfg.planned_steps()["pretrain"])
