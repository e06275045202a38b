"""The GPU check (scripts/gpu-check.sh): its dry run on this CPU, the wheel verification and the docs section.

The dry run prepares everything the device needs (it downloads the wheels for Python 3.12, so it needs the
package index, as CI's install does; and ../shared/data for the data subset), installs the wheels for a 3.12
target, and runs every stage with tiny sizes. The report must hold every stage with finite figures, or an
explicit reason where a stage cannot apply (no switch exists).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.benchmarks import gpu_check, gpu_report

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
DRY_RUN_DEADLINE_S = 1800.0  # a deadline for a dry run that hangs, not a speed (benchmarks measure speed)


def _numbers(value: Any) -> list[float]:
    """Every int or float inside a JSON value."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def _out_of_time(report: dict[str, Any]) -> dict[tuple[str, str], str]:
    """The stages a dry run could not finish in its time budget (skipped before they started, or stopped at their
    limit), with the reason each gives: on a busy machine a dry run may run out of time, which is no failure."""
    return {
        (s["kind"], s["name"]): str(s["reason"])
        for s in report["stages"]
        if s["status"] == "timeout" or (s["status"] == "skipped" and "out of the time budget" in s.get("reason", ""))
    }


def _skip_if_out_of_time(report: dict[str, Any]) -> None:
    late = _out_of_time(report)
    if late:
        pytest.skip(
            f"the dry run ran out of its {report['config']['budget_s']} s budget on this machine: "
            + "; ".join(f"{kind} {name}: {why}" for (kind, name), why in late.items())
        )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """(output folder, work folder, wall seconds) of one dry run."""
    if not (DATA / "empiar10017" / "bin4").is_dir():
        pytest.skip(f"development data not present at {DATA}")
    base = tmp_path_factory.mktemp("gpu-check")
    out, work = base / "out", base / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYOMAE_")}
    env["PYTHON"] = sys.executable
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run", "--out", str(out), "--work", str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DRY_RUN_DEADLINE_S,
    )
    wall = time.monotonic() - t0
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return out, work, wall


def test_dry_run_measures_every_stage(dry_run: tuple[Path, Path, float]) -> None:
    """Every stage is in the report, with finite figures; a stage the busy machine gave no time is skipped with its
    reason (the whole test is then reported skipped, after the stages that ran are checked)."""
    out, _, _ = dry_run
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["mode"] == "dry-run" and report["device"] == "cpu"
    late = _out_of_time(report)
    stages = {(s["kind"], s["name"]): s for s in report["stages"]}
    cfg = report["config"]
    expected = {("ceilings", "bf16 matrix rate and copy bandwidth"), ("service", "capacity"), ("service", "latency")}
    expected |= {("pick", f"{p} {n}²") for p in cfg["presets"] for n in cfg["sizes"]}
    expected |= {("train", p) for p in cfg["train_presets"]}
    expected |= {("switch", f"{sw['optimisation']} ({sw['case'] or 'no switch'})") for sw in gpu_check.SWITCHES}
    assert set(stages) == expected
    for key, s in stages.items():
        if s["kind"] == "switch" and s["switch"] is None:
            assert (s["status"], s["reason"]) == ("skipped", "no switch exists"), key
            assert s["prediction"]
            continue
        if key in late:
            continue
        assert s["status"] == "ok", (key, s.get("reason"))
        numbers = _numbers(s["result"])
        assert numbers and all(math.isfinite(n) for n in numbers), key
    stages = {key: s for key, s in stages.items() if key not in late}

    ran = {key: s["result"] for key, s in stages.items() if s["status"] == "ok"}
    if ("ceilings", "bf16 matrix rate and copy bandwidth") in ran:
        assert ran[("ceilings", "bf16 matrix rate and copy bandwidth")]["matmul"]["flops_per_s"] > 0
    for p in cfg["presets"]:
        for n in cfg["sizes"]:
            if ("pick", f"{p} {n}²") in ran:
                r = ran[("pick", f"{p} {n}²")]
                assert r["pick_s"] > 0 and r["windows"] > 0 and 0 < r["achieved_fraction"] < 1
    for p in cfg["train_presets"]:
        if ("train", p) in ran:
            r = ran[("train", p)]
            assert r["train_s"] > 0 and 0 <= r["f1"] <= 1 and 0 <= r["ap"] <= 1 and r["queries"] == cfg["queries"]
    capacity, latency = ran.get(("service", "capacity")), ran.get(("service", "latency"))
    if capacity is not None:
        assert capacity["picked"] == capacity["micrographs"] == cfg["capacity_count"]
        assert capacity["per_hour"] > 0 and capacity["queue_never_empty"]
    if latency is not None:
        # the micrographs written after the model are live; the exemplars' micrograph is too when the watcher saw
        # it complete only after the (tiny) model was published, as on a busy machine
        assert latency["picked"] == latency["micrographs"]
        assert cfg["latency_count"] <= latency["latency"]["n"] <= latency["micrographs"]
        assert 0 < latency["latency"]["p50_s"] <= latency["latency"]["p95_s"]
    for s in stages.values():
        if s["kind"] == "switch" and s["switch"] is not None and "speed_up" in s.get("result", {}):
            assert s["result"]["on"]["pick_s"] > 0 and s["result"]["off"]["pick_s"] > 0
    read_ahead = next((s for s in stages.values() if s["kind"] == "switch" and s["case"] == "service"), None)
    if read_ahead is not None and capacity is not None:
        assert read_ahead["result"]["other"]["pick_workers"] != capacity["pick_workers"]
    _skip_if_out_of_time(report)


def test_dry_run_markdown_has_every_table_and_row(dry_run: tuple[Path, Path, float]) -> None:
    out, _, _ = dry_run
    report = json.loads((out / "gpu-check.json").read_text())
    md = (out / "gpu-check.md").read_text()
    assert md == gpu_check.markdown(report)
    _skip_if_out_of_time(report)
    for header in (
        "| ceiling |",
        "| preset | micrograph |",
        "| preset | training from 15 exemplars, s |",
        "| picker service |",
        "| optimisation | switch |",
        "| target (one H200) |",
    ):
        assert header in md
    for s in report["stages"]:
        if s["kind"] == "pick":
            assert f"| {s['preset']} | {s['size']}² | {s['result']['pick_s']:.3f} |" in md
        if s["kind"] == "train":
            assert f"| {s['preset']} | {s['result']['train_s']:.1f} |" in md
    assert md.count("| no switch exists |") == 2
    assert "not judged: not a GPU figure" in md and "| met |" not in md and "| missed |" not in md
    assert (out / "gpu-check.log").stat().st_size > 0


def test_dry_run_prepares_exactly_the_missing_wheels_and_the_data(dry_run: tuple[Path, Path, float]) -> None:
    out, work, _ = dry_run
    wheels = json.loads((out / "wheels.json").read_text())
    assert wheels["problems"] == []
    assert set(wheels["wheels"]) == {gpu_check.normalize(n) for n in gpu_check.MISSING_ON_DEVICE}
    assert {p.name for p in (work / "wheels").glob("*.whl")} == {w["file"] for w in wheels["wheels"].values()}
    assert wheels["total_bytes"] < gpu_check.WHEEL_BUDGET_BYTES
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert len(manifest["files"]) == 2 * sum(n for _, n in gpu_check.DATA_SUBSET)
    assert all((work / "data" / f["path"]).stat().st_size == f["bytes"] for f in manifest["files"])
    assert manifest["total_bytes"] < gpu_check.DATA_BUDGET_BYTES
    assert json.loads((work / "prepared.json").read_text())["commit"]


def _fake_wheel(folder: Path, filename: str, requires: list[str]) -> None:
    name, version = filename.split("-")[:2]
    with zipfile.ZipFile(folder / filename, "w") as zf:
        meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        zf.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta + [f"Requires-Dist: {r}" for r in requires]))


def test_verify_wheels_names_every_problem(tmp_path: Path) -> None:
    versions = gpu_check.wheel_versions()
    for name, version in versions.items():
        if name in ("pika", "watchdog", "pydantic-core", "structlog"):
            continue
        _fake_wheel(tmp_path, f"{name.replace('-', '_')}-{version}-py3-none-any.whl", [])
    _fake_wheel(tmp_path, "pika-0.0.1-py3-none-any.whl", [])  # not this environment's version
    _fake_wheel(tmp_path, f"pydantic_core-{versions['pydantic-core']}-cp311-cp311-manylinux_2_17_x86_64.whl", [])
    _fake_wheel(tmp_path, f"watchdog-{versions['watchdog']}-py3-none-macosx_11_0_arm64.whl", [])
    _fake_wheel(
        tmp_path,
        f"structlog-{versions['structlog']}-py3-none-any.whl",
        ["not-on-the-device>=1", "windows-only; platform_system == 'Windows'", "old-only; python_version < '3.11'"],
    )
    _fake_wheel(tmp_path, "extra_pkg-1.0-py3-none-any.whl", [])
    problems = gpu_check.verify_wheels(tmp_path)["problems"]
    assert sorted(problems) == sorted(
        [
            f"pika: wheel 0.0.1, this environment {versions['pika']}",
            (
                f"pydantic_core-{versions['pydantic-core']}-cp311-cp311-manylinux_2_17_x86_64.whl: no tag for CPython "
                "3.12 on x86-64 Linux"
            ),
            f"watchdog-{versions['watchdog']}-py3-none-macosx_11_0_arm64.whl: no tag for CPython 3.12 on x86-64 Linux",
            "structlog needs not-on-the-device>=1: neither a wheel nor on the device",
            "unexpected wheel: extra_pkg-1.0-py3-none-any.whl",
        ]
    )


def test_stage_limits_record_timeouts_and_errors_and_go_on(tmp_path: Path) -> None:
    import torch

    cfg = {**gpu_check.DRY, "budget_s": 60}
    check = gpu_check.Check(tmp_path, cfg, "dry-run", tmp_path, torch.device("cpu"))

    spun_to_the_end: list[bool] = []

    def spin() -> dict[str, Any]:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            pass
        spun_to_the_end.append(True)
        return {}

    def fail() -> dict[str, Any]:
        raise ValueError("broken")

    slow = check.stage("pick", "slow", 0.5, spin)
    assert slow["status"] == "timeout" and "ran past its limit" in slow["reason"]
    assert not spun_to_the_end  # the limit interrupted the stage
    bad = check.stage("pick", "bad", 10, fail)
    assert (bad["status"], bad["reason"]) == ("error", "ValueError: broken")
    good = check.stage("pick", "good", 10, lambda: {"pick_s": 1.0})
    assert good["status"] == "ok" and good["result"] == {"pick_s": 1.0}
    check.t0 -= 55  # 5 s of the budget left: a stage with a longer limit is not started
    late = check.stage("pick", "late", 30, lambda: {"pick_s": 1.0})
    assert late["status"] == "skipped" and "out of the time budget" in late["reason"]
    saved = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [s["status"] for s in saved["stages"]] == ["timeout", "error", "ok", "skipped"]


def test_docs_section_shows_only_gpu_figures(dry_run: tuple[Path, Path, float], tmp_path: Path) -> None:
    out, _, _ = dry_run
    report = json.loads((out / "gpu-check.json").read_text())
    doc = tmp_path / "benchmarks.md"
    original = "# Benchmarks\n\nintro\n\n## Speed per preset\n\nfigures\n"
    doc.write_text(original)
    dry_json = out / "gpu-check.json"
    assert gpu_report.main(["--json", str(dry_json), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith(original.rstrip("\n"))
    assert "No GPU has run the GPU check yet (the report is from a dry-run run)" in text
    assert "| ceiling |" not in text and gpu_report.DEVICE_COMMAND in text
    assert gpu_report.main(["--json", str(dry_json), "--doc", str(doc), "--check"]) == 0

    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({**report, "mode": "gpu"}))
    assert gpu_report.main(["--json", str(gpu), "--doc", str(doc), "--check"]) == 1
    assert gpu_report.main(["--json", str(gpu), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.count(gpu_report.BEGIN) == 1 and text.count("## GPU") == 1
    assert gpu_check.markdown({**report, "mode": "gpu"}).rstrip("\n") in text
    assert text.startswith(original.rstrip("\n"))
    doc.write_text(text + "\n## Later section\n")  # a section after it stays where it is
    assert gpu_report.main(["--json", str(gpu), "--doc", str(doc)]) == 0
    assert doc.read_text() == text + "\n## Later section\n"
    regenerated = gpu_report.keep_section(original, doc.read_text())  # compare.py rewriting the file
    assert regenerated.count(gpu_report.BEGIN) == 1 and regenerated.startswith(original.rstrip("\n"))


def test_docs_benchmarks_gpu_section_is_generated() -> None:
    """docs/benchmarks.md's GPU section is what gpu_report.py makes of docs/gpu-check.json (or of its absence)."""
    assert gpu_report.main(["--check"]) == 0
