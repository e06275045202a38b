"""Speed benchmark: seconds per micrograph, windows per second, FLOPs and memory of every preset.

For each preset and micrograph size (1024 x 1024: the first query of ``empiar10017/bin4``, particle diameter
27 px; 4096 x 4096: the first query of ``empiar10017/full``, 108 px) the picker runs on the micrograph as a
service would (read, normalise and resample, score every window, peaks, per-micrograph cutoff). Every case runs
in its own subprocess so that its peak memory is its own. Speed does not depend on the weights, so the models
are untrained (initialised as for training) with a bank of 120 features (15 exemplars x 8 views) taken from
the reference micrograph; training time from the 15 protocol exemplars is measured separately
(``--train-presets``), with the default training configuration.

FLOPs count 2 per multiply-add of the path the picker takes (``cryomae.picking.picker.scoring_flops``); the
achieved fraction compares them per second with this device's measured matrix-multiply rate (bf16 on a GPU,
float32 on the CPU). Cases that would take longer than ``--max-seconds`` are timed on a crop and
extrapolated by window count (marked so in the report).

    .venv/bin/python tests/benchmarks/speed.py                          # all presets, both sizes, this device
    .venv/bin/python tests/benchmarks/speed.py --presets fast --sizes 1024 --repeats 3

This file is not collected by pytest (it is not named ``test_*.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryomae.config import PickConfig, TrainConfig
from cryomae.device import resolve_device
from cryomae.io import read_coordinates, read_micrograph
from cryomae.model.checkpoint import TrainedModel
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import get_preset
from cryomae.picking.picker import pick_micrograph, scoring_flops, shared_tokens_apply
from cryomae.preprocess import Geometry, prepare
from cryomae.training.train import exemplar_bank, train_model
from tests.benchmarks.accuracy import DEFAULT_DATA_ROOT, PROJECT_ROOT, command_line, git_commit, machine

SIZES: dict[int, tuple[str, float]] = {1024: ("empiar10017/bin4", 27.0), 4096: ("empiar10017/full", 108.0)}
DEFAULT_JSON = PROJECT_ROOT / "docs" / "benchmarks-speed.json"
N_EXEMPLARS, EXEMPLAR_SEED = 15, 0


def say(message: str) -> None:
    print(message, flush=True)


def _dataset(size: int, data_root: Path) -> tuple[Path, Path, float]:
    """(reference micrograph, first query, diameter) of the dataset used for ``size``."""
    name, diameter = SIZES[size]
    mics = sorted(p for p in (data_root / name / "micrographs").iterdir() if p.is_file())
    if len(mics) < 2:
        raise SystemExit(f"speed: {data_root / name} needs at least two micrographs")
    return mics[0], mics[1], diameter


def _exemplars(reference: Path) -> np.ndarray:
    truth = read_coordinates(reference.parent.parent / "coords" / f"{reference.stem}.star").xy
    return truth[np.random.default_rng(EXEMPLAR_SEED).choice(len(truth), N_EXEMPLARS, replace=False)]


def parse_preset(spec: str) -> tuple[str, int | None]:
    """``name`` or ``name@layer`` (feature layer override, e.g. ``paper@-1`` = the paper's last-layer latent)."""
    name, _, layer = spec.partition("@")
    try:
        get_preset(name)
        return name, int(layer) if layer else None
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"speed.py: error: preset {spec!r}: {exc}") from None


def untrained(spec: str, reference: Path, diameter: float, device: torch.device) -> TrainedModel:
    """A freshly initialised model of the preset with a bank from the reference's 15 protocol exemplars."""
    name, layer = parse_preset(spec)
    preset = get_preset(name) if layer is None else dataclasses.replace(get_preset(name), feature_layer=layer)
    torch.manual_seed(0)
    model = MaskedAutoencoder(preset).to(device).eval()
    geometry = Geometry(diameter=diameter, box_factor=1.0, img_size=preset.img_size, lowpass=1.0, ice_z=3.0)
    image = prepare(read_micrograph(reference).data, geometry, device)
    cfg = TrainConfig()  # the default bank (its size sets the cost of the max in the score)
    xy = geometry.to_model(_exemplars(reference))
    bank = exemplar_bank(model, image, xy, device, kind=cfg.bank, views=cfg.bank_views, rotations=cfg.bank_rotations)
    return TrainedModel(model=model, bank=bank, geometry=geometry, manifest={})


def matmul_rate(device: torch.device) -> dict[str, Any]:
    """Measured dense matrix-multiply rate (FLOP/s): bf16 8192^3 on a GPU, float32 2048^3 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    dt = (time.perf_counter() - t0) / reps
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "flops_per_s": 2 * n**3 / dt}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_case(
    spec: str,
    size: int,
    device_name: str,
    data_root: Path,
    repeats: int,
    max_seconds: float,
    stride_fraction: float,
    rate: float,
) -> dict[str, Any]:
    """Time one preset on one micrograph size (run in a child process)."""
    device = resolve_device(device_name)
    reference, query, diameter = _dataset(size, data_root)
    trained = untrained(spec, reference, diameter, device)
    cfg = PickConfig(device=str(device), stride_fraction=stride_fraction)
    t0 = time.perf_counter()
    image = read_micrograph(query).data
    read_s = time.perf_counter() - t0
    s = trained.preset.img_size
    stride = max(1, round(s * cfg.stride_fraction))
    shape = (
        int(image.shape[0] * trained.geometry.scale) + 2 * (s // 2),
        int(image.shape[1] * trained.geometry.scale) + 2 * (s // 2),
    )
    flops = scoring_flops(trained, shape, stride, cfg)
    shared = shared_tokens_apply(trained, shape, stride, cfg, device)
    macs = flops["shared"] if shared else flops["windowed"]
    estimate_s = 2 * macs / rate
    extrapolated = estimate_s > max_seconds
    work = image
    if extrapolated:  # a centred crop with about max_seconds / 4 of the work by the FLOP estimate, >= one box
        frac = min(1.0, np.sqrt(max_seconds / 4 / estimate_s))
        side = max(int(image.shape[0] * frac), int(np.ceil(trained.geometry.box)))
        y0, x0 = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        work = image[y0 : y0 + side, x0 : x0 + side]
    pick_micrograph(trained, work[: work.shape[0] // 2, : work.shape[1] // 2], cfg)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(1 if extrapolated else repeats):
        _sync(device)
        t1 = time.perf_counter()
        result = pick_micrograph(trained, work, cfg)
        _sync(device)
        runs.append((time.perf_counter() - t1, result))
    pick_s, result = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    windows = flops["windows"]
    if extrapolated:
        windows_done = result.n_windows
        pick_s *= windows / windows_done
        score_s = result.timings["score_map"] * windows / windows_done
    else:
        score_s = result.timings["score_map"]
    out = {
        "preset": spec,
        "size": size,
        "device": str(device),
        "stride_px": stride,
        "windows": int(windows),
        "path": "shared tokens" if shared else "windowed",
        "read_s": read_s,
        "pick_s": pick_s,
        "score_map_s": score_s,
        "windows_per_s": windows / score_s,
        "flops": 2 * macs,
        "achieved_fraction": 2 * macs / score_s / rate,
        "extrapolated": extrapolated,
        "repeats": len(runs),
        "candidates": len(result.candidate_scores),
    }
    if device.type == "cuda":
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def train_case(spec: str, device_name: str, data_root: Path) -> dict[str, Any]:
    """Default training from the 15 protocol exemplars of the bin4 reference (run in a child process)."""
    name, layer = parse_preset(spec)
    reference, _, diameter = _dataset(1024, data_root)
    cfg = TrainConfig(preset=name, feature_layer=layer, device=device_name)
    t0 = time.perf_counter()
    _, info = train_model(read_micrograph(reference), _exemplars(reference), diameter, cfg)
    out = {
        "preset": spec,
        "train_s": time.perf_counter() - t0,
        "timings_s": info["timings_s"],
        "device": str(resolve_device(device_name)),
    }
    if torch.cuda.is_available() and resolve_device(device_name).type == "cuda":
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=PROJECT_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "args": args}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _peak_memory(case: dict[str, Any]) -> str:
    """The GPU allocator's peak where a GPU was used, else the process's peak resident memory."""
    if "peak_gpu_bytes" in case:
        return f"{case['peak_gpu_bytes'] / 2**30:.2f} GiB GPU"
    return f"{case['peak_rss_bytes'] / 2**30:.2f} GiB RSS"


def markdown(report: dict[str, Any]) -> str:
    """The speed tables as Markdown."""
    m = report["machine"]
    rate = report["matmul"]
    lines = [
        f"Device: {report['device']} ({m['cuda_device'] or m['cpu_model'] or m['processor']}, "
        f"{m['cpu_count']} CPU cores, torch {m['torch']}); measured matrix-multiply rate "
        f"{rate['flops_per_s'] / 1e12:.2f} TFLOP/s ({rate['dtype']}). "
        f"Commit {report['commit']}, {report['date']}. Command: `{report['command']}`",
        "",
        "| preset | micrograph | stride px | windows | path | s / micrograph | scoring s | windows / s | GFLOP | "
        "of matmul rate | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        if "error" in c:
            lines.append(f"| {c['args']} | error: {c['error']} |")
            continue
        ext = " (extrapolated)" if c["extrapolated"] else ""
        lines.append(
            f"| {c['preset']} | {c['size']}² | {c['stride_px']} | {c['windows']:,} | {c['path']} | "
            f"{c['pick_s']:.2f}{ext} | {c['score_map_s']:.2f} | {c['windows_per_s']:,.0f} | {c['flops'] / 1e9:,.1f} | "
            f"{100 * c['achieved_fraction']:.1f} % | {_peak_memory(c)} |"
        )
    if report["training"]:
        lines += [
            "",
            "| preset | training from 15 exemplars, s | prepare / pre-train / SCS s | peak memory |",
            "|---|---|---|---|",
        ]
        for t in report["training"]:
            if "error" in t:
                lines.append(f"| {t['args']} | error: {t['error']} | | |")
                continue
            ts = t["timings_s"]
            lines.append(
                f"| {t['preset']} | {t['train_s']:.1f} | {ts['prepare']:.1f} / {ts['pretrain']:.1f} / "
                f"{ts['scs_train']:.1f} | {_peak_memory(t)} |"
            )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--presets",
        default="fast,small,base,paper,paper@-1",
        help="presets, each NAME or NAME@LAYER (feature layer override; paper@-1 = the paper's latent)",
    )
    ap.add_argument("--sizes", default="1024,4096", help="micrograph sizes: 1024 (bin4) and/or 4096 (full)")
    ap.add_argument("--stride-fractions", default="0.125", help="stride / window side values to time")
    ap.add_argument(
        "--train-presets",
        default=None,
        help="presets whose training time to measure (default: fast,small on the CPU, all on a GPU)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (the median is reported)")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="cases estimated to take longer are timed on a crop and extrapolated",
    )
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write every figure")
    ap.add_argument("--case", nargs=4, metavar=("PRESET", "SIZE", "STRIDE_FRACTION", "RATE"), help=argparse.SUPPRESS)
    ap.add_argument("--train-case", metavar="PRESET", help=argparse.SUPPRESS)
    ap.add_argument(
        "--matching",
        action="store_true",
        help="only time the evaluation's matching of 10,000 picks to 1,000 particles (median of --repeats)",
    )
    return ap


def matching_seconds(repeats: int) -> dict[str, float]:
    """Seconds to match 10,000 picks (three near each of 1,000 particles, 7,000 anywhere) on a 4096 px micrograph:
    the evaluation's cost on a crowded micrograph (this figure was once a test's assertion)."""
    from cryomae.evaluation.metrics import match_picks

    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 4000, size=(1000, 2))
    picks = np.concatenate([truth + rng.normal(0, 5, size=truth.shape)] * 3 + [rng.uniform(0, 4000, (7000, 2))])
    scores = rng.uniform(size=len(picks))
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        match_picks(picks, scores, truth, diameter=100.0)
        times.append(time.perf_counter() - t0)
    return {"median_s": round(float(np.median(times)), 4), "min_s": round(min(times), 4), "max_s": round(max(times), 4)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.case:
        spec, size, frac, rate = args.case
        print(
            json.dumps(
                one_case(
                    spec,
                    int(size),
                    args.device,
                    args.data_root,
                    args.repeats,
                    args.max_seconds,
                    float(frac),
                    float(rate),
                )
            )
        )
        return 0
    if args.train_case:
        print(json.dumps(train_case(args.train_case, args.device, args.data_root)))
        return 0
    if args.matching:
        print(json.dumps({"matching_10000_picks": matching_seconds(args.repeats)}))
        return 0
    device = resolve_device(args.device)
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        parse_preset(p)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for size in sizes:
        if size not in SIZES:
            raise SystemExit(f"speed.py: error: size {size} is not one of {', '.join(map(str, SIZES))}")
        folder = args.data_root / SIZES[size][0] / "micrographs"
        if not folder.is_dir():
            raise SystemExit(f"speed.py: error: {folder} is not a folder (set --data-root)")
    train_presets = (
        args.train_presets.split(",")
        if args.train_presets is not None
        else (presets if device.type == "cuda" else ["fast", "small"])
    )
    rate = matmul_rate(device)
    say(f"speed: {device}, matrix-multiply rate {rate['flops_per_s'] / 1e12:.3f} TFLOP/s ({rate['dtype']})")
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": command_line(),
        "device": str(device),
        "machine": machine(),
        "matmul": rate,
        "cases": [],
        "training": [],
    }
    common = [
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--max-seconds",
        str(args.max_seconds),
        "--data-root",
        str(args.data_root),
    ]
    for size in sizes:
        for spec in presets:
            for frac in args.stride_fractions.split(","):
                case = _child([*common, "--case", spec, str(size), frac, str(rate["flops_per_s"])])
                report["cases"].append(case)
                if "error" in case:
                    say(f"  {spec} {size}: error {case['error']}")
                else:
                    say(
                        f"  {spec} {size}² stride {case['stride_px']}: {case['pick_s']:.2f} s/micrograph "
                        f"({case['windows_per_s']:,.0f} windows/s, {case['path']}"
                        f"{', extrapolated' if case['extrapolated'] else ''})"
                    )
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=1))
    for spec in [p for p in train_presets if p]:
        t = _child([*common, "--train-case", spec])
        report["training"].append(t)
        say(f"  training {spec}: " + (f"{t['train_s']:.1f} s" if "error" not in t else f"error {t['error']}"))
        args.json.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
