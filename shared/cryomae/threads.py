"""How many CPU threads torch, OpenMP and BLAS may use: the CPUs this process is given, not the host's cores.

torch sizes its thread pool to the host's cores, and its OpenMP threads spin while they wait for each other. On a
shared node, or in a Kubernetes pod whose CPU limit is below the node's cores, that makes training many times
slower: a thread spins on a core that another job needs while the thread it waits for is not running
(docs/performance.md, "A busy machine"). So every process, before torch loads:

- sizes the pools to its CPU share: the CPUs in its affinity mask, and no more than the cgroup CPU quota
  (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in v1), rounded up; ``CRYOMAE_THREADS``
  (or an ``OMP_NUM_THREADS`` already set) overrides it;
- lets an OpenMP thread that waits spin only briefly before it sleeps (``GOMP_SPINCOUNT=1000`` for libgomp, the
  OpenMP runtime of torch's Linux builds, instead of its 300,000), unless the environment says otherwise
  (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` set). Measured in tests/benchmarks/contention.py against sleeping at
  once (``OMP_WAIT_POLICY=PASSIVE``), which is as fast beside other jobs but slower on a quiet machine, where a
  short spin catches most waits.

Torch-free: the operator's commands and the watcher, writer and gallery import it too.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

THREADS_ENV = "CRYOMAE_THREADS"
# what the thread pools read when they load; OMP covers torch's intra-op pool (libgomp), the rest BLAS libraries
POOL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPIN_ENV = "GOMP_SPINCOUNT"
SPIN_COUNT = "1000"  # measured: tests/benchmarks/contention.py, docs/performance.md


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all online CPUs where the platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _v2_quota(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (``"max 100000"``: none; ``"150000 100000"``: 1.5)."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = float(parts[0]), float(parts[1])
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    """CPUs allowed by a cgroup v1 cpu controller folder (quota -1: none)."""
    try:
        quota = float((folder / "cpu.cfs_quota_us").read_text())
        period = float((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _ancestors(mount: Path, relative: str) -> list[Path]:
    """``mount/relative`` and each folder above it up to ``mount``: a limit set on a parent cgroup binds too."""
    parts = [p for p in relative.split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(proc: Path = Path("/proc/self"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest CPU quota of this process's cgroups, in CPUs (None: no quota, or no cgroup to read).

    Inside a container the cgroup namespace makes the process's own cgroup the root, so the root's files are read
    too. ``proc`` and ``cgroup_root`` are parameters so that tests can lay out both cgroup versions."""
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: one unified hierarchy
            mount = cgroup_root if (cgroup_root / "cgroup.controllers").exists() else cgroup_root / "unified"
            for folder in _ancestors(mount, relative):
                try:
                    quota = _v2_quota((folder / "cpu.max").read_text())
                except OSError:
                    continue
                if quota is not None:
                    limits.append(quota)
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own hierarchy
            v1 = next(
                (cgroup_root / name for name in (controllers, "cpu", "cpu,cpuacct") if (cgroup_root / name).is_dir()),
                None,
            )
            if v1 is None:
                continue
            for folder in _ancestors(v1, relative):
                quota = _v1_quota(folder)
                if quota is not None:
                    limits.append(quota)
    return min(limits) if limits else None


def cpu_share() -> int:
    """The CPUs this process may use: its affinity, capped by its cgroup quota rounded up; at least 1."""
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit - 1e-9))
    return max(1, cpus)


def _positive_int(value: str, name: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name}={value!r}: expected a whole number of threads, 1 or more")
    return number


def thread_count(threads: int | None = None, environ: dict[str, str] | None = None) -> int:
    """The threads to use: ``threads`` when given, else ``CRYOMAE_THREADS``, else an ``OMP_NUM_THREADS`` that the
    environment already sets, else the CPU share (``cpu_share``)."""
    env = os.environ if environ is None else environ
    if threads is not None:
        return _positive_int(str(threads), THREADS_ENV)
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value:
            return _positive_int(value, name)
    return cpu_share()


def configure_threads(threads: int | None = None) -> int:
    """Size torch's and the BLAS libraries' thread pools to ``thread_count(threads)`` and make waiting OpenMP
    threads sleep after a short spin; returns the count. Call it before torch loads (the OpenMP runtime reads its
    environment once, when it loads); when torch is already loaded its pool is resized as well."""
    n = thread_count(threads)
    for name in POOL_ENV:
        os.environ[name] = str(n)
    if WAIT_POLICY_ENV not in os.environ:  # an explicit policy sets its own spin count
        os.environ.setdefault(SPIN_ENV, SPIN_COUNT)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    return n
