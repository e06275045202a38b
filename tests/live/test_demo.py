"""``cryomae demo`` end to end on synthetic micrographs (small and fast; the default plays the real data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cryomae.errors import InputError
from cryomae.operator.demo import DemoOptions, run_demo
from tests.live.conftest import TINY_TRAINING
from tests.messaging.conftest import AMQP_URL


@pytest.mark.parametrize("broker", ["memory://", pytest.param(AMQP_URL, marks=pytest.mark.rabbitmq)])
def test_demo_plays_a_session_and_reports_latency_throughput_and_f1(tmp_path: Path, broker: str) -> None:
    out = tmp_path / "demo"
    lines: list[str] = []
    # the tiny model, trained for a few seconds: long enough for the progress display to show it training
    tiny = {**{k: v for k, v in TINY_TRAINING.items() if k != "preset"}, "pretrain_epochs": 80}
    opts = DemoOptions(
        out=out,
        source="synthetic",
        count=5,
        interval_s=0.2,
        exemplars_after=2,
        broker=broker,
        preset="test",
        train_overrides=tiny,
    )
    report = run_demo(opts, progress=lines.append)
    assert report["complete"] and report["picked"] == 5 and report["dead_lettered"] == 0
    assert report["accuracy"]["micrographs"] == 4  # every micrograph but the reference is scored
    assert 0.0 <= report["accuracy"]["f1"] <= 1.0 and report["accuracy"]["truth"] > 0
    latencies = report["latency_live"]["n"] + report["latency_backlog"]["n"]
    assert latencies == 5
    # the feed paused for the model, so at least the 3 micrographs written after the exemplars measure the live
    # latency (the 2 before may have been judged complete after the tiny model was published too)
    assert report["latency_live"]["n"] >= 3, report
    assert report["feed_held_s"] > 0
    text = "\n".join(lines)
    headline = next(line for line in text.splitlines() if "latency (file complete -> rows in the STAR):" in line)
    assert f"over {report['latency_live']['n']} micrographs" in headline and "none" not in headline, headline
    # training progress is shown while the model trains (the stage and step the trainer reports), with the time
    # left at the pace so far
    training = [line for line in lines if "model training (" in line]
    assert training, lines
    assert any(
        re.search(r"model training \((pretrain|scs_train) \d+/\d+, about \d+ (s|min) left\)", t) for t in training
    )
    assert report["training_s"] is not None and report["training_s"] > 0
    assert report["unfinished"] is None and report["training"] == f"{report['training_s']:.1f} s"
    assert "None" not in text
    assert json.loads((out / "report.json").read_text())["picked"] == 5
    assert any("exemplars" in line and "registered" in line for line in lines)
    assert any(line.startswith("demo complete: 5/5") for line in "\n".join(lines).splitlines())
    # the outputs are the live session's STAR files
    assert (Path(report["outputs"]) / "particles.star").is_file()
    # and the session page: its path printed at the end, every picked micrograph on it with a picture
    page = Path(report["gallery"])
    assert any(f"session page: {page}" in line for line in "\n".join(lines).splitlines())
    text = (page.parent / "session.js").read_text()
    data = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert len(data["micrographs"]) == 5 and all(m["image"] for m in data["micrographs"])


def test_demo_refuses_to_replace_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="was not made by `cryomae demo`"):
        run_demo(DemoOptions(out=tmp_path, source="synthetic", count=2), progress=None)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_an_incomplete_demo_says_what_did_not_finish_and_why(tmp_path: Path) -> None:
    """A training that fails stops the demo at once (no waiting for a limit); the report names what did not finish
    and why, prints no None, and names no session page that was never written."""
    lines: list[str] = []
    opts = DemoOptions(
        out=tmp_path / "demo",
        source="synthetic",
        count=3,
        interval_s=0.1,
        exemplars_after=1,
        preset="test",
        # a facility encoder that is not there: the training fails when it starts
        train_overrides={**{k: v for k, v in TINY_TRAINING.items() if k != "preset"}, "encoder": str(tmp_path / "no")},
    )
    report = run_demo(opts, progress=lines.append)
    assert not report["complete"] and report["picked"] == 0
    assert report["training"].startswith("failed: ") and str(tmp_path / "no") in report["training"]
    assert report["unfinished"] == (
        f"3 of 3 micrographs not picked; training {report['training']}: nothing can be picked without a model "
        "(`cryomae status` shows the training's error)"
    )
    assert report["gallery"] is None
    text = "\n".join(lines)
    assert "None" not in text, text
    assert "demo INCOMPLETE: 0/3 micrographs picked" in text
    assert f"what did not finish: {report['unfinished']}" in text
    assert "session page: not written (no micrograph was picked)" in text
    assert "training: failed: " in text


def test_a_stalled_demo_gives_up_after_its_stall_limit_not_a_fixed_time(tmp_path: Path) -> None:
    """Nothing progresses (the exemplars wait for micrographs the feed writes only every 10 minutes): the demo gives
    up after its stall limit, and says so."""
    opts = DemoOptions(
        out=tmp_path / "demo", source="synthetic", count=3, interval_s=600.0, exemplars_after=3, stall_s=1.0
    )
    report = run_demo(opts, progress=None)
    assert not report["complete"]
    assert report["unfinished"] == (
        "3 of 3 micrographs not picked; training not started (no exemplars registered): nothing progressed for 1 s "
        "(no micrograph written, training step or pick)"
    )
