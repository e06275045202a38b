"""Thread pools sized to the CPU share (cryomae.threads): affinity, cgroup v1 and v2 quotas, the override, and
what a fresh process's torch ends up with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cryomae import threads
from tests.e2e.test_cli import cli


def _v2(tmp_path: Path, cgroup: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self and a cgroup v2 mount whose folders (relative path -> cpu.max text) hold ``limits``."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    (proc / "cgroup").write_text(f"0::{cgroup}\n")
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for relative, text in limits.items():
        folder = root / relative.strip("/") if relative.strip("/") else root
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text(text + "\n")
    return proc, root


def test_cgroup_v2_quota_is_the_tightest_of_the_process_and_its_parents(tmp_path: Path) -> None:
    proc, root = _v2(
        tmp_path, "/kubepods/pod1/c1", {"/kubepods/pod1/c1": "max 100000", "/kubepods/pod1": "150000 100000"}
    )
    assert threads.cgroup_cpu_limit(proc, root) == pytest.approx(1.5)


def test_cgroup_v2_without_a_quota_is_no_limit(tmp_path: Path) -> None:
    proc, root = _v2(tmp_path, "/", {"/": "max 100000"})
    assert threads.cgroup_cpu_limit(proc, root) is None


def test_cgroup_v2_in_a_container_reads_its_own_root(tmp_path: Path) -> None:
    """With a cgroup namespace the process's cgroup is "/": the mount's own cpu.max is the container's limit."""
    proc, root = _v2(tmp_path, "/", {"/": "50000 100000"})
    assert threads.cgroup_cpu_limit(proc, root) == pytest.approx(0.5)


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    (proc / "cgroup").write_text("4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(proc, root) == pytest.approx(3.0)


def test_no_cgroup_file_is_no_limit(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(tmp_path / "missing", tmp_path) is None


def test_cpu_share_is_the_affinity_capped_by_the_quota_rounded_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 16)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert threads.cpu_share() == 3
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.2)
    assert threads.cpu_share() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.cpu_share() == 16
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 2)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 8.0)
    assert threads.cpu_share() == 2


def test_thread_count_order_setting_then_cryomae_threads_then_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cpu_share", lambda: 7)
    assert threads.thread_count(None, {}) == 7
    assert threads.thread_count(None, {"OMP_NUM_THREADS": "3"}) == 3
    assert threads.thread_count(None, {"OMP_NUM_THREADS": "3", "CRYOMAE_THREADS": "2"}) == 2
    assert threads.thread_count(5, {"CRYOMAE_THREADS": "2"}) == 5
    with pytest.raises(ValueError, match="CRYOMAE_THREADS='zero'"):
        threads.thread_count(None, {"CRYOMAE_THREADS": "zero"})
    with pytest.raises(ValueError, match="1 or more"):
        threads.thread_count(None, {"CRYOMAE_THREADS": "0"})


def _fresh(code: str, **env: str) -> dict[str, object]:
    """Run ``code`` in a new interpreter (nothing loaded yet) and return the JSON it prints last."""
    unset = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CRYOMAE_THREADS")
    clean = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


PROBE = """
import json, os, sys
{setup}
from cryomae.threads import configure_threads
n = configure_threads()
import torch
print(json.dumps({{"n": n, "torch": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"],
                  "wait": os.environ.get("OMP_WAIT_POLICY"), "spin": os.environ.get("GOMP_SPINCOUNT")}}))
"""


def test_a_fresh_process_sizes_torch_to_its_affinity() -> None:
    """One CPU in the affinity mask: one torch thread, whatever the host has; waiting threads sleep after a short
    spin."""
    got = _fresh(PROBE.format(setup="os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})"))
    assert got == {"n": 1, "torch": 1, "omp": "1", "wait": None, "spin": "1000"}


def test_cryomae_threads_overrides_and_an_explicit_wait_policy_is_kept() -> None:
    got = _fresh(PROBE.format(setup=""), CRYOMAE_THREADS="1", OMP_NUM_THREADS="4", OMP_WAIT_POLICY="ACTIVE")
    assert got == {"n": 1, "torch": 1, "omp": "1", "wait": "ACTIVE", "spin": None}
    assert _fresh(PROBE.format(setup=""), GOMP_SPINCOUNT="300000")["spin"] == "300000"


def test_torch_loaded_first_is_resized() -> None:
    code = "import json, torch\nfrom cryomae.threads import configure_threads\nconfigure_threads(1)\n"
    code += "print(json.dumps({'torch': torch.get_num_threads()}))"
    assert _fresh(code, OMP_NUM_THREADS="2") == {"torch": 1}


def test_the_command_line_refuses_a_bad_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYOMAE_THREADS", "-2")
    code, _out, err = cli("config", "reference")  # restores the logging set-up main() changes
    assert code == 2
    assert "CRYOMAE_THREADS='-2'" in err
