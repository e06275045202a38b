"""The GPU check (issue 14): every GPU figure of the project in one process, within a wall-time budget.

Run by ``scripts/gpu-check.sh`` (see its header for the device command); three subcommands:

    prepare-data SRC DEST    copy the fixed data subset (4 bin4 micrographs, 2 full-size JPEGs, their STAR files)
    verify-wheels DIR        check that DIR holds exactly the wheels the device lacks, for Python 3.12 x86-64,
                             with every requirement met there (JSON on stdout, exit 1 on a problem)
    run --out DIR            measure; ``--dry-run`` does the same with tiny sizes on this CPU

``run`` measures, stage by stage, each under its own time limit (SIGALRM) and inside the overall ``--budget-s``
(a stage that would start with less than its limit left is skipped with the reason): the ceilings (bf16
matrix-multiply rate, copy bandwidths), picking seconds per micrograph of every preset at 1024² and 4096² (warm,
with the achieved fraction of the matrix rate and peak GPU memory), training from 15 exemplars with F1 / AP on a
few bin4 queries, the picker service over the in-memory broker (capacity in micrographs per hour, and the latency
file complete -> rows in the session STAR), and each GPU optimisation with its switch on and off, the prediction
beside it. The report (``gpu-check.json``, ``gpu-check.md``) is rewritten after every stage, so a run cut short
still leaves what it measured. ``gpu_report.py`` turns a GPU run's JSON into the GPU section of docs/benchmarks.md.

This file is not collected by pytest (it is not named ``test_*.py``); tests/deploy/test_gpu_check.py runs the
dry run.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCHEMA = 1

# ------------------------------------------------------------------------------------------ wheels and data

# What the device's Python 3.12 lacks of the project's run-time dependencies (distribution names as the wheels
# spell them). Their versions are this checkout's .venv's at preparation time. typing-extensions is there but
# may be older than pydantic needs, so it travels too (it comes first on PYTHONPATH).
MISSING_ON_DEVICE = (
    "mrcfile",
    "starfile",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "pydantic-settings",
    "python-dotenv",
    "structlog",
    "pika",
    "watchdog",
)
# What the device's Python has (the device tool's README).
DEVICE_PROVIDES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "scipy",
    "pandas",
    "safetensors",
    "prometheus-client",
    "scikit-image",
    "tifffile",
    "pillow",
    "pyyaml",
    "pytest",
    "packaging",
)
# Requirements a wheel declares that nothing we run imports: they do not travel.
NOT_NEEDED = {"pyarrow": "declared by starfile, imported neither by starfile nor by cryomae (pandas works without it)"}
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORM = re.compile(
    r"^(any|manylinux1_x86_64|manylinux2010_x86_64|manylinux2014_x86_64|manylinux_2_\d+_x86_64)$"
)
# the code the check imports on the device: its third-party imports must all be covered
IMPORTED_CODE = (
    "shared/cryomae",
    "tests/benchmarks/gpu_check.py",
    "tests/benchmarks/speed.py",
    "tests/benchmarks/accuracy.py",
)
WHEEL_BUDGET_BYTES = 16 << 20
DATA_BUDGET_BYTES = 24 << 20

# the fixed data subset: (dataset, micrographs taken: the first N by name, i.e. the reference and N-1 queries)
DATA_SUBSET = (("empiar10017/bin4", 4), ("empiar10017/full", 2))


def normalize(name: str) -> str:
    """A distribution name in the canonical form of PEP 503."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_versions() -> dict[str, str]:
    """The pinned ``NAME==VERSION`` of every wheel to download: this environment's installed versions."""
    return {name: metadata.version(name) for name in MISSING_ON_DEVICE}


def _wheel_metadata(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode("utf-8", "replace").splitlines()


def _third_party_imports(paths: Sequence[Path]) -> set[str]:
    """Top-level modules imported (absolute imports) by the Python files under ``paths``, minus the stdlib and
    the project's own packages."""
    mods: set[str] = set()
    for root in paths:
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for f in files:
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m not in ("cryomae", "tests")}


def verify_wheels(wheel_dir: Path) -> dict[str, Any]:
    """Check the wheel folder for the device: exactly ``MISSING_ON_DEVICE`` at this environment's versions, each
    installable on CPython 3.12 x86-64 Linux, every requirement (markers evaluated for that Python) met by a
    wheel or the device, and every third-party import of the code the check runs covered. ``problems`` lists
    what is wrong (empty: ready)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename
    from packaging.version import Version

    problems: list[str] = []
    wanted = {normalize(k): v for k, v in wheel_versions().items()}
    wheels: dict[str, dict[str, Any]] = {}
    for path in sorted(wheel_dir.glob("*.whl")):
        dist, version, _, tags = parse_wheel_filename(path.name)
        ok_tag = any(
            t.interpreter in ("py3", "py2", "cp312", "py312")
            and t.abi in ("none", "abi3", "cp312")
            and DEVICE_PLATFORM.match(t.platform)
            for t in tags
        )
        if not ok_tag:
            problems.append(f"{path.name}: no tag for CPython {DEVICE_PYTHON} on x86-64 Linux")
        wheels[normalize(dist)] = {
            "file": path.name,
            "version": str(version),
            "bytes": path.stat().st_size,
            "requires": [
                ln.split(":", 1)[1].strip() for ln in _wheel_metadata(path) if ln.startswith("Requires-Dist:")
            ],
        }
    problems.extend(f"missing wheel: {name}=={wanted[name]}" for name in sorted(set(wanted) - set(wheels)))
    problems.extend(f"unexpected wheel: {wheels[name]['file']}" for name in sorted(set(wheels) - set(wanted)))
    problems.extend(
        f"{name}: wheel {wheels[name]['version']}, this environment {wanted[name]}"
        for name in sorted(set(wheels) & set(wanted))
        if wheels[name]["version"] != wanted[name]
    )
    env: dict[str, str] = {
        **{k: str(v) for k, v in default_environment().items()},
        "python_version": DEVICE_PYTHON,
        "python_full_version": f"{DEVICE_PYTHON}.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "extra": "",
    }
    device = {normalize(n) for n in DEVICE_PROVIDES}
    for name, info in sorted(wheels.items()):
        for spec in info["requires"]:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = normalize(req.name)
            if dep in wheels:
                if not req.specifier.contains(Version(wheels[dep]["version"]), prereleases=True):
                    problems.append(f"{name} needs {spec}; the wheel is {wheels[dep]['version']}")
            elif dep not in device and dep not in NOT_NEEDED:
                problems.append(f"{name} needs {spec}: neither a wheel nor on the device")
    modules = _third_party_imports([PROJECT_ROOT / p for p in IMPORTED_CODE])
    dists = metadata.packages_distributions()
    for mod in sorted(modules):
        names = {normalize(d) for d in dists.get(mod, [])}
        if not names:
            problems.append(f"import {mod}: no installed distribution provides it")
        elif not names & (set(wheels) | device):
            problems.append(f"import {mod} ({', '.join(sorted(names))}): neither a wheel nor on the device")
    total = sum(w["bytes"] for w in wheels.values())
    if total > WHEEL_BUDGET_BYTES:
        problems.append(f"wheels take {total / 2**20:.1f} MiB, more than {WHEEL_BUDGET_BYTES >> 20} MiB")
    return {
        "python": DEVICE_PYTHON,
        "wheels": {n: {k: v for k, v in w.items() if k != "requires"} for n, w in sorted(wheels.items())},
        "total_bytes": total,
        "imports_checked": sorted(modules),
        "not_needed": NOT_NEEDED,
        "problems": problems,
    }


def prepare_data(src: Path, dest: Path) -> dict[str, Any]:
    """Copy ``DATA_SUBSET`` from ``src`` (the shared data root) into ``dest`` with the same layout, replacing what
    was there; returns the manifest (also written to ``dest/manifest.json``)."""
    if dest.exists():
        shutil.rmtree(dest)
    files: list[dict[str, Any]] = []
    for name, count in DATA_SUBSET:
        folder = src / name
        mics = sorted(p for p in (folder / "micrographs").iterdir() if p.is_file())[:count]
        if len(mics) < count:
            raise SystemExit(f"gpu_check: {folder}/micrographs has {len(mics)} micrographs, {count} needed")
        for mic in mics:
            star = folder / "coords" / f"{mic.stem}.star"
            for item, sub in ((mic, "micrographs"), (star, "coords")):
                target = dest / name / sub / item.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(item, target)
                files.append({"path": f"{name}/{sub}/{item.name}", "bytes": target.stat().st_size})
        if (folder / "dataset.json").is_file():
            shutil.copyfile(folder / "dataset.json", dest / name / "dataset.json")
    total = sum(f["bytes"] for f in files)
    if total > DATA_BUDGET_BYTES:
        raise SystemExit(f"gpu_check: the data subset takes {total / 2**20:.1f} MiB (limit {DATA_BUDGET_BYTES >> 20})")
    manifest = {"source": str(src), "subset": [list(s) for s in DATA_SUBSET], "files": files, "total_bytes": total}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# --------------------------------------------------------------------------------------------- measuring

REAL: dict[str, Any] = {
    "presets": ["fast", "small", "base", "paper", "paper@-1"],
    "sizes": [1024, 4096],
    "repeats": 3,
    "max_seconds": 2.0,  # picking cases estimated longer are timed on a crop and extrapolated (speed.py)
    "matmul": "speed.matmul_rate (bf16 8192^3 on a GPU)",
    "copy_mib": 1024,
    "train_presets": ["fast", "base", "paper"],
    "train_overrides": {},  # the default TrainConfig for every preset
    "queries": 3,
    "service_preset": "base",
    "service_size": 4096,
    "service_train": {"pretrain_epochs": 1, "epochs": 2},  # the service's speed does not depend on the weights
    "capacity_count": 24,
    "latency_count": 8,
    "latency_interval_s": 2.0,
    "switch_preset": "base",
    "switch_size": 4096,
    "switch_crop": None,  # the whole micrograph
    "windowed_preset": "paper@-1",
    "windowed_crop": 256,  # side of the bin4 crop the window-by-window switches are timed on
    "fixed_batch": 2048,
    "limits_s": {
        "ceilings": 60,
        "pick": 60,
        "train": {"fast": 60, "base": 90, "paper": 180},
        "train_default": 90,
        "service": 90,
        "switch": 60,
    },
    "budget_s": 450,
}
DRY: dict[str, Any] = {
    **REAL,
    "presets": ["test", "fast"],
    "repeats": 1,
    "max_seconds": 10.0,
    "copy_mib": 64,
    "train_presets": ["test"],
    "train_overrides": {
        "box_factor": 1.5,
        "pretrain_regions": 128,
        "pretrain_epochs": 1,
        "epochs": 2,
        "n_unlabeled": 64,
    },
    "queries": 1,
    "service_preset": "test",
    "service_size": 1024,
    "service_train": {"box_factor": 1.5, "pretrain_regions": 128, "pretrain_epochs": 1, "epochs": 2, "n_unlabeled": 64},
    "capacity_count": 3,
    "latency_count": 2,
    "latency_interval_s": 0.5,
    "switch_preset": "fast",
    "switch_size": 1024,
    "switch_crop": 384,
    "windowed_preset": "test",
    "windowed_crop": 96,
    "fixed_batch": 256,
    "limits_s": {"ceilings": 30, "pick": 40, "train": {}, "train_default": 60, "service": 60, "switch": 30},
    "budget_s": 170,
}

# The GPU optimisations and their switches, with the prediction made before any GPU run (README, "Ready for
# the GPU"). ``measure``: how the check times it; None where no switch exists.
SWITCHES: list[dict[str, Any]] = [
    {
        "optimisation": "bf16 autocast",
        "switch": "CRYOMAE_AUTOCAST=off",
        "case": "switch_preset",
        "measure": "autocast",
        "prediction": "about 1x: on the shared-token path only the patch-embedding convolution runs under autocast",
    },
    {
        "optimisation": "bf16 autocast",
        "switch": "CRYOMAE_AUTOCAST=off",
        "case": "windowed_preset",
        "measure": "autocast",
        "prediction": "2-8x window by window (ViT-B is compute-bound; the bf16 dense rate is about 2x TF32 and "
        "15x FP32)",
    },
    {
        "optimisation": "encoder batch from free GPU memory",
        "switch": "pick.batch_size = null (on) / fixed_batch (off)",
        "case": "windowed_preset",
        "measure": "batch",
        "prediction": "no gain on a large GPU (2,048 ViT-B windows already fill it); it avoids running out of "
        "memory on a small one",
    },
    {
        "optimisation": "shared tokens (one convolution of the whole micrograph)",
        "switch": "pick.shared_tokens",
        "case": "switch_preset",
        "measure": "shared_tokens",
        "prediction": "several times faster (6.4x on the CPU for fast); less on the GPU, where the rest of the "
        "pick weighs more",
    },
    {
        "optimisation": "read-ahead (next micrograph read while this one is scored)",
        "switch": "CRYOMAE_PICK_WORKERS = 2 (on) / 1 (off)",
        "case": "service",
        "measure": "read_ahead",
        "prediction": "up to 2x throughput when the CPU's share of a pick (reading, peaks) equals the GPU's",
    },
    {
        "optimisation": "pinned host memory, asynchronous copies",
        "switch": None,
        "case": "",
        "measure": None,
        "prediction": "under 1 %: one 64 MB copy per 4096² micrograph; the ceilings give its pageable and pinned "
        "copy times",
    },
    {
        "optimisation": "torch.compile, CUDA graphs",
        "switch": None,
        "case": "",
        "measure": None,
        "prediction": "under 10 % for fast (few, large kernels per micrograph); worth measuring for paper@-1",
    },
]


class StageTimeout(BaseException):  # a BaseException, so that no ``except Exception`` swallows it
    """A stage ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in this (the main) thread after ``seconds``."""

    def _raise(signum: int, frame: object) -> None:
        raise StageTimeout

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def say(message: str) -> None:
    print(f"[gpu-check {datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


class Check:
    """The report being built, written out after every stage."""

    def __init__(self, out: Path, cfg: dict[str, Any], mode: str, data: Path, device: Any) -> None:
        from tests.benchmarks.accuracy import command_line, git_commit, machine

        self.out = out
        self.cfg = cfg
        self.data = data
        self.device = device
        self.t0 = time.monotonic()
        self.report: dict[str, Any] = {
            "schema": SCHEMA,
            "mode": mode,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit() or _prepared(data).get("commit"),
            "prepared": _prepared(data),
            "command": command_line(),
            "device": str(device),
            "machine": machine(),
            "python": sys.version.split()[0],
            "config": cfg,
            "stages": [],
        }

    def remaining(self) -> float:
        return self.cfg["budget_s"] - (time.monotonic() - self.t0)

    def stage(
        self, kind: str, name: str, limit: float, fn: Callable[[], dict[str, Any]], **info: Any
    ) -> dict[str, Any]:
        """Run ``fn`` under ``limit`` seconds (or what is left of the budget, when less); record the outcome."""
        entry: dict[str, Any] = {"kind": kind, "name": name, **info, "limit_s": limit}
        left = self.remaining()
        if left < min(limit, 10.0):
            entry.update(
                status="skipped", reason=f"out of the time budget ({left:.0f} s left of {self.cfg['budget_s']})"
            )
        else:
            allowed = min(limit, left)
            entry["limit_s"] = round(allowed, 1)
            say(f"{kind}: {name} (limit {allowed:.1f} s)")
            t0 = time.perf_counter()
            try:
                with time_limit(allowed):
                    entry["result"] = fn()
                entry["status"] = "ok"
            except StageTimeout:
                entry.update(status="timeout", reason=f"ran past its limit of {allowed:.1f} s")
            except Exception as exc:  # noqa: BLE001 -- recorded; the run goes on with the next stage
                entry.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            say(
                f"  {entry['status']} in {entry['seconds']:.1f} s"
                + (f": {entry['reason']}" if "reason" in entry else "")
            )
            _free_memory()
        self.report["stages"].append(entry)
        self.write()
        return entry

    def write(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu-check.json").write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        (self.out / "gpu-check.md").write_text(markdown(self.report))


def _prepared(data: Path) -> dict[str, Any]:
    """What ``scripts/gpu-check.sh --prepare`` recorded beside the data (commit, date): the device's copy of the
    working tree has no git history."""
    path = data.parent / "prepared.json"
    try:
        recorded: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return recorded


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceilings(device: Any, copy_mib: int) -> dict[str, Any]:
    """The measured bf16 matrix-multiply rate (speed.py's: 8192^3 on a GPU; float32 2048^3 on the CPU) and copy
    bandwidths: device to device, and host to device from pageable and from pinned memory (GPU)."""
    import torch

    from tests.benchmarks.speed import matmul_rate

    out: dict[str, Any] = {"matmul": matmul_rate(device)}
    n = copy_mib << 20

    def rate(copy: Callable[[], object], nbytes: int, reps: int = 5) -> float:
        copy()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            copy()
        _sync(device)
        return nbytes * reps / (time.perf_counter() - t0)

    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    # a copy reads and writes every byte: 2 n bytes of memory traffic
    out["copy_device_bytes_per_s"] = rate(lambda: dst.copy_(src), 2 * n)
    if device.type == "cuda":
        host = torch.empty(n, dtype=torch.uint8)
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        out["h2d_pageable_bytes_per_s"] = rate(lambda: dst.copy_(host), n)
        out["h2d_pinned_bytes_per_s"] = rate(lambda: dst.copy_(pinned, non_blocking=True), n)
        out["gpu"] = torch.cuda.get_device_name(device)
        out["gpu_memory_bytes"] = int(torch.cuda.get_device_properties(device).total_memory)
    out["copy_mib"] = copy_mib
    return out


def pick_case(spec: str, size: int, check: Check) -> dict[str, Any]:
    """speed.py's case: the preset on the first query of the size's dataset, warm, median of ``repeats``."""
    from tests.benchmarks.speed import one_case

    rate = check.report.get("rate") or 0.0
    return one_case(
        spec, size, str(check.device), check.data, check.cfg["repeats"], check.cfg["max_seconds"], 0.125, rate
    )


def _switch_image(which: str, check: Check) -> tuple[Any, Any, float, str]:
    """(trained model, image, diameter, description) of a switch case: the ``switch_preset`` on the first query
    at ``switch_size``, or the ``windowed_preset`` on a centred ``windowed_crop`` of the first bin4 query."""
    from cryomae.io import read_micrograph
    from tests.benchmarks.speed import _dataset, untrained

    if which == "windowed_preset":
        size, crop, spec = 1024, check.cfg["windowed_crop"], check.cfg["windowed_preset"]
    else:
        size, crop, spec = check.cfg["switch_size"], check.cfg["switch_crop"], check.cfg["switch_preset"]
    reference, query, diameter = _dataset(size, check.data)
    image = read_micrograph(query).data
    what = f"{size}² micrograph"
    if crop:
        y0, x0 = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
        image = image[y0 : y0 + crop, x0 : x0 + crop]
        what = f"{crop}² crop of a {what}"
    return untrained(spec, reference, diameter, check.device), image, diameter, f"{spec}, {what}"


def time_pick(trained: Any, image: Any, cfg: Any, repeats: int, device: Any) -> dict[str, Any]:
    """Warm-up, then the median of ``repeats`` picks (seconds) and the peak GPU memory of the timed picks."""
    import torch

    from cryomae.picking.picker import pick_micrograph

    pick_micrograph(trained, image, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        result = pick_micrograph(trained, image, cfg)
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"pick_s": sorted(times)[len(times) // 2], "windows": result.n_windows}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


@contextlib.contextmanager
def env_set(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def switch_case(sw: dict[str, Any], check: Check) -> dict[str, Any]:
    """Time the pick with the switch on and off (same model, same image, median of ``repeats`` each)."""
    from cryomae.config import PickConfig

    trained, image, _, what = _switch_image(sw["case"], check)
    base: dict[str, Any] = {"device": str(check.device)}
    if sw["case"] == "windowed_preset":
        base["shared_tokens"] = False  # the window-by-window path, whatever the preset's feature layer
    variants: dict[str, tuple[dict[str, Any], str | None]] = {
        "autocast": ({}, "off"),
        "batch": ({"batch_size": check.cfg["fixed_batch"]}, None),
        "shared_tokens": ({"shared_tokens": False}, None),
    }
    off_cfg, off_env = variants[sw["measure"]]
    repeats = check.cfg["repeats"]
    with env_set("CRYOMAE_AUTOCAST", "bf16"):
        on = time_pick(trained, image, PickConfig(**base), repeats, check.device)
    with env_set("CRYOMAE_AUTOCAST", off_env or "bf16"):
        off = time_pick(trained, image, PickConfig(**{**base, **off_cfg}), repeats, check.device)
    return {"what": what, "on": on, "off": off, "speed_up": off["pick_s"] / on["pick_s"]}


def train_case(preset: str, check: Check) -> dict[str, Any]:
    """Train on the bin4 reference with the 15 protocol exemplars, then pick ``queries`` queries: train seconds,
    F1, AP (accuracy.py's ``run_cryomae``)."""
    from cryomae.config import PickConfig, TrainConfig
    from tests.benchmarks.accuracy import Dataset, few_shot_split, run_cryomae

    split = few_shot_split(Dataset("empiar10017/bin4", check.data / "empiar10017" / "bin4"), check.cfg["queries"])
    cfg = TrainConfig(preset=preset, device=str(check.device), **check.cfg["train_overrides"])
    row = run_cryomae(split, preset, cfg, PickConfig(device=str(check.device)), f"train {preset}")
    return {
        "train_s": row.train_s,
        "timings_s": row.details["train_info"].get("timings_s"),
        "f1": row.f1,
        "ap": row.ap,
        "precision": row.precision,
        "recall": row.recall,
        "queries": row.n_queries,
        "pick_s_per_micrograph": row.pick_s_per_micrograph,
        "train_config": {k: v for k, v in cfg.model_dump().items() if k in check.cfg["train_overrides"]},
    }


def service_source(check: Check, folder: Path, count: int) -> tuple[Path, float]:
    """A demo source of ``count`` MRC copies of the first query at ``service_size`` (hard links of one file, with
    the reference's STAR file for each): the service's input without carrying more data."""
    from cryomae.io import read_micrograph, write_mrc
    from tests.benchmarks.speed import _dataset

    reference, query, diameter = _dataset(check.cfg["service_size"], check.data)
    (folder / "micrographs").mkdir(parents=True, exist_ok=True)
    (folder / "coords").mkdir(parents=True, exist_ok=True)
    first = folder / "micrographs" / "mic_000.mrc"
    write_mrc(first, read_micrograph(query).data)
    star = reference.parent.parent / "coords" / f"{query.stem}.star"
    for i in range(count):
        target = folder / "micrographs" / f"mic_{i:03d}.mrc"
        if i:
            os.link(first, target)
        shutil.copyfile(star, folder / "coords" / f"mic_{i:03d}.star")
    return folder, diameter


def service_case(check: Check, run: str, workers: int) -> dict[str, Any]:
    """``cryomae demo`` (every service in this process, in-memory broker) on copies of a ``service_size``
    micrograph. ``capacity``: all written at once, waiting for the model; the backlog's drain rate is the
    capacity. ``latency``: one every ``latency_interval_s`` after the model, file complete -> rows in the STAR."""
    from cryomae.operator.demo import PROJECT, SESSION, DemoOptions, run_demo
    from cryomae.store.outputs import SessionOutputs

    cfg = check.cfg
    count = cfg["capacity_count"] if run == "capacity" else cfg["latency_count"] + 1
    work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{run}-"))
    try:
        source, diameter = service_source(check, work / "source", count)
        opts = DemoOptions(
            out=work / "demo",
            source=str(source),
            count=count,
            interval_s=0.0 if run == "capacity" else cfg["latency_interval_s"],
            exemplars_after=1,
            preset=cfg["service_preset"],
            diameter=diameter,
            train_overrides=cfg["service_train"],
            timeout_s=cfg["limits_s"]["service"],
            hold_for_model=run != "capacity",
        )
        with (
            env_set("CRYOMAE_PICK_WORKERS", str(workers)),
            env_set("CRYOMAE_METRICS_PORT", "0"),
            env_set("CRYOMAE_DEVICE", str(check.device)),
        ):
            report = run_demo(opts, progress=None)
        entries = SessionOutputs(opts.out / "outputs" / PROJECT / SESSION, read_only=True).micrographs()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "run": run,
        "pick_workers": workers,
        "preset": cfg["service_preset"],
        "size": cfg["service_size"],
        "micrographs": report["micrographs"],
        "picked": report["picked"],
        "complete": report["complete"],
        "dead_lettered": report["dead_lettered"],
        "training_s": report["training_s"],
        "interval_s": report["interval_s"],
        "latency": report["latency_live"] if run == "latency" else report["latency_backlog"],
        "per_hour": None,
    }
    if run == "capacity":
        # the rate at which rows reach the STAR while the queue is never empty: every micrograph was complete
        # before the one ahead of it was written (checked, and reported as ``queue_never_empty``)
        done = sorted(entries, key=lambda e: e.applied_at)
        span = done[-1].applied_at - done[0].applied_at if len(done) > 1 else 0.0
        out["per_hour"] = (len(done) - 1) / span * 3600.0 if span > 0 else None
        out["queue_never_empty"] = all(b.complete_at <= a.applied_at for a, b in itertools.pairwise(done))
    else:
        out["per_hour"] = None if report["throughput_per_min"] is None else report["throughput_per_min"] * 60.0
    return out


def run_check(out: Path, data: Path, dry_run: bool, budget_s: float | None) -> dict[str, Any]:
    import torch

    from cryomae.device import resolve_device

    cfg = json.loads(json.dumps(DRY if dry_run else REAL))
    if budget_s is not None:
        cfg["budget_s"] = budget_s
    device = resolve_device("auto")
    mode = "dry-run" if dry_run else ("gpu" if device.type == "cuda" else "cpu")
    if not dry_run and device.type != "cuda":
        say("no CUDA device: the figures are this CPU's (use --dry-run for the quick check)")
    check = Check(out, cfg, mode, data, device)
    say(f"{mode} on {device} (torch {torch.__version__}, Python {check.report['python']}), budget {cfg['budget_s']} s")
    lim = cfg["limits_s"]

    c = check.stage(
        "ceilings", "bf16 matrix rate and copy bandwidth", lim["ceilings"], lambda: ceilings(device, cfg["copy_mib"])
    )
    check.report["rate"] = c.get("result", {}).get("matmul", {}).get("flops_per_s") or 1e12
    for size in cfg["sizes"]:
        for spec in cfg["presets"]:
            check.stage(
                "pick",
                f"{spec} {size}²",
                lim["pick"],
                partial(pick_case, spec, size, check),
                preset=spec,
                size=size,
            )
    workers_on = 2 if device.type == "cuda" else 1  # the service's default (Settings.pick_workers)
    check.stage("service", "capacity", lim["service"], lambda: service_case(check, "capacity", workers_on))
    check.stage("service", "latency", lim["service"], lambda: service_case(check, "latency", workers_on))
    for sw in SWITCHES:
        name = f"{sw['optimisation']} ({sw['case'] or 'no switch'})"
        if sw["measure"] is None:
            check.report["stages"].append(
                {"kind": "switch", "name": name, "status": "skipped", "reason": "no switch exists", **_switch_info(sw)}
            )
            continue
        if sw["measure"] == "read_ahead":
            other = 1 if workers_on == 2 else 2  # the capacity stage ran with the default
            check.stage(
                "switch",
                name,
                lim["service"],
                partial(_other_workers, check, other),
                **_switch_info(sw),
            )
            continue
        check.stage("switch", name, lim["switch"], partial(switch_case, sw, check), **_switch_info(sw))
    for preset in cfg["train_presets"]:
        check.stage(
            "train",
            preset,
            lim["train"].get(preset, lim["train_default"]),
            partial(train_case, preset, check),
            preset=preset,
        )
    check.write()
    say(f"done in {check.report['wall_s']} s: {out / 'gpu-check.json'}, {out / 'gpu-check.md'}")
    return check.report


def _other_workers(check: Check, workers: int) -> dict[str, Any]:
    return {"other": service_case(check, "capacity", workers)}


def _switch_info(sw: dict[str, Any]) -> dict[str, Any]:
    return {k: sw[k] for k in ("optimisation", "switch", "case", "prediction")}


# ------------------------------------------------------------------------------------------------- report


def _f(value: Any, fmt: str = ".2f", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value * scale, fmt)


def _status(entry: dict[str, Any]) -> str:
    return "ok" if entry["status"] == "ok" else f"{entry['status']}: {entry.get('reason', '')}".replace("|", "/")


def _gib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def targets(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The issue's targets (for one H200) against the figures: (target, figure, verdict)."""
    by = {(s["kind"], s["name"]): s.get("result") for s in report["stages"] if s.get("status") == "ok"}
    rows: list[tuple[str, str, str]] = []

    def add(target: str, value: float | None, unit: str, limit: float, at_most: bool = True) -> None:
        if value is None:
            rows.append((target, "-", "not measured"))
            return
        met = value <= limit if at_most else value >= limit
        rows.append((target, f"{value:,.2f} {unit}", "met" if met else "missed"))

    def figure(kind: str, name: str, key: str) -> Any:
        result = by.get((kind, name))
        return None if result is None else result.get(key)

    add("paper preset <= 1.5 s per 4096² micrograph", figure("pick", "paper 4096²", "pick_s"), "s", 1.5)
    add("GPU default preset (base) <= 0.3 s per 4096² micrograph", figure("pick", "base 4096²", "pick_s"), "s", 0.3)
    f1_base, f1_paper = figure("train", "base", "f1"), figure("train", "paper", "f1")
    if f1_base is None or f1_paper is None:
        rows.append(("GPU default preset (base): F1 no lower than paper's", "-", "not measured"))
    else:
        verdict = "met" if f1_base >= f1_paper else "missed"
        rows.append(
            ("GPU default preset (base): F1 no lower than paper's", f"{f1_base:.3f} vs {f1_paper:.3f}", verdict)
        )
    for preset in ("fast", "base", "paper"):
        add(f"training {preset} from 15 exemplars <= 60 s", figure("train", preset, "train_s"), "s", 60)
    add(
        "one GPU keeps up with >= 7,200 micrographs per hour",
        figure("service", "capacity", "per_hour"),
        "/ h",
        7200,
        at_most=False,
    )
    latency = figure("service", "latency", "latency")
    add("end-to-end latency <= 2 s (p95)", None if latency is None else latency.get("p95_s"), "s", 2)
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables: ceilings, picking, training, service, switches, targets."""
    m = report["machine"]
    stages = report["stages"]
    lines = [
        f"Mode: **{report['mode']}**. Device: {report['device']} ({m.get('cuda_device') or m.get('cpu_model')}, "
        f"{m.get('cpu_count')} CPU cores, torch {m.get('torch')}, Python {report['python']}). Commit "
        f"{report['commit']}, {report['date']}, {report.get('wall_s', 0):.0f} s of a {report['config']['budget_s']} s "
        f"budget. Command: `{report['command']}`",
        "",
        "| ceiling | measured | status |",
        "|---|---|---|",
    ]
    for s in (s for s in stages if s["kind"] == "ceilings"):
        r = s.get("result") or {}
        mm = r.get("matmul") or {}
        lines.append(
            f"| matrix multiply ({mm.get('dtype', '-')}, {mm.get('n', '-')}³) | "
            f"{_f(mm.get('flops_per_s'), '.2f', 1e-12)} TFLOP/s | {_status(s)} |"
        )
        lines.append(
            f"| copy, device memory ({r.get('copy_mib', '-')} MiB, read + write) | "
            f"{_f(r.get('copy_device_bytes_per_s'), '.1f', 1e-9)} GB/s | {_status(s)} |"
        )
        for key, what in (
            ("h2d_pageable_bytes_per_s", "host to device, pageable"),
            ("h2d_pinned_bytes_per_s", "host to device, pinned"),
        ):
            lines.append(
                f"| copy, {what} | "
                + (f"{r[key] / 1e9:.1f} GB/s | {_status(s)} |" if key in r else "- | skipped: no GPU |")
            )
    lines += [
        "",
        "| preset | micrograph | s / micrograph | scoring s | path | windows | of matmul rate | "
        "peak GPU memory | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in (s for s in stages if s["kind"] == "pick"):
        r = s.get("result") or {}
        ext = " (extrapolated)" if r.get("extrapolated") else ""
        lines.append(
            f"| {s.get('preset', s['name'])} | {s.get('size', '-')}² | {_f(r.get('pick_s'), '.3f')}{ext} | "
            f"{_f(r.get('score_map_s'), '.3f')} | "
            f"{r.get('path', '-')} | {_f(r.get('windows'), ',.0f')} | {_f(r.get('achieved_fraction'), '.1f', 100)} % | "
            f"{_gib(r.get('peak_gpu_bytes'))} | {_status(s)} |"
        )
    lines += [
        "",
        "| preset | training from 15 exemplars, s | prepare / pre-train / SCS s | F1 | AP | queries | "
        "pick s / micrograph | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in (s for s in stages if s["kind"] == "train"):
        r = s.get("result") or {}
        ts = r.get("timings_s") or {}
        split = " / ".join(_f(ts.get(k), ".1f") for k in ("prepare", "pretrain", "scs_train"))
        lines.append(
            f"| {s.get('preset', s['name'])} | {_f(r.get('train_s'), '.1f')} | {split} | {_f(r.get('f1'), '.3f')} | "
            f"{_f(r.get('ap'), '.3f')} | {r.get('queries', '-')} | {_f(r.get('pick_s_per_micrograph'), '.3f')} "
            f"| {_status(s)} |"
        )
    lines += [
        "",
        "| picker service | preset, micrograph | pick workers | micrographs | micrographs / hour | "
        "latency p50 / p95 s | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in (s for s in stages if s["kind"] == "service"):
        r = s.get("result") or {}
        lat = r.get("latency") or {}
        lines.append(
            f"| {s['name']} | {r.get('preset', '-')}, {r.get('size', '-')}² | {r.get('pick_workers', '-')} | "
            f"{r.get('picked', '-')}/{r.get('micrographs', '-')} | {_f(r.get('per_hour'), ',.0f')} | "
            f"{_f(lat.get('p50_s'))} / {_f(lat.get('p95_s'))} | {_status(s)} |"
        )
    lines += [
        "",
        "| optimisation | switch | case | on | off | gain (off time / on time) | prediction | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in (s for s in stages if s["kind"] == "switch"):
        r = s.get("result") or {}
        if "speed_up" in r:
            on, off = f"{r['on']['pick_s']:.3f} s", f"{r['off']['pick_s']:.3f} s"
            gain, case = f"{r['speed_up']:.2f}x", r["what"]
        elif "other" in r:
            svc = next((x.get("result") for x in stages if x["kind"] == "service" and x["name"] == "capacity"), None)
            runs = {x["pick_workers"]: x.get("per_hour") for x in (svc, r["other"]) if x}
            on_h, off_h = runs.get(2), runs.get(1)
            on, off = f"{_f(on_h, ',.0f')} / h (2 workers)", f"{_f(off_h, ',.0f')} / h (1 worker)"
            gain = f"{on_h / off_h:.2f}x" if on_h and off_h else "-"
            case = f"picker service, capacity ({r['other']['preset']}, {r['other']['size']}²)"
        else:
            on = off = gain = "-"
            case = s.get("case") or "-"
        lines.append(
            f"| {s['optimisation']} | {s.get('switch') or 'no switch exists'} | {case} | {on} | {off} | "
            f"{gain} | {s['prediction']} | {_status(s)} |"
        )
    lines += ["", "| target (one H200) | figure here | verdict |", "|---|---|---|"]
    for t, fig, verdict in targets(report):
        lines.append(f"| {t} | {fig} | {verdict if report['mode'] == 'gpu' else 'not judged: not a GPU figure'} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-data", help="copy the fixed data subset")
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    v = sub.add_parser("verify-wheels", help="check the wheel folder for the device")
    v.add_argument("wheels", type=Path)
    v.add_argument("--versions", action="store_true", help="print NAME==VERSION of every wheel to download")
    r = sub.add_parser("run", help="measure")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--data", type=Path, default=PROJECT_ROOT / ".gpu-check" / "data")
    r.add_argument("--dry-run", action="store_true", help="tiny sizes, on this CPU")
    r.add_argument("--budget-s", type=float, default=None, help="overall time budget (default: 450; dry run 170)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare-data":
        manifest = prepare_data(args.src, args.dest)
        print(f"gpu_check: {len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB in {args.dest}")
        return 0
    if args.command == "verify-wheels":
        if args.versions:
            print("\n".join(f"{k}=={v}" for k, v in wheel_versions().items()))
            return 0
        result = verify_wheels(args.wheels)
        print(json.dumps(result, indent=1))
        return 1 if result["problems"] else 0
    if not (args.data / "manifest.json").is_file():
        raise SystemExit(f"gpu_check: no data subset in {args.data} (run scripts/gpu-check.sh --prepare)")
    run_check(args.out, args.data, args.dry_run, args.budget_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
