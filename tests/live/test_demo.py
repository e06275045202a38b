"""``cryomae demo`` end to end on synthetic micrographs (small and fast; the default plays the real data)."""

from __future__ import annotations

import json
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
    # training progress is shown while the model trains (the stage and step the trainer reports)
    assert any("model training (" in line for line in lines), lines
    assert report["training_s"] is not None and report["training_s"] > 0
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
