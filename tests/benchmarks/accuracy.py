"""Accuracy benchmark: the few-shot protocol of the CryoMAE paper on every development dataset.

For each dataset under the data root (every folder with ``micrographs/`` and ``coords/``) and each requested
preset: train on the reference micrograph (the first by file name) with the 15 protocol exemplars, pick every
query micrograph (all the others), and score the picks against the ground truth with the paper's rule (IoU of
diameter-sized boxes >= 0.5, one-to-one, pooled over the queries). A difference-of-Gaussians picker runs on
the same queries as a training-free floor. The figures go to a Markdown report (and optionally JSON).

Run from the project root (see tests/benchmarks/README.md):

    .venv/bin/python tests/benchmarks/accuracy.py                       # everything, writes runs/accuracy.md
    .venv/bin/python tests/benchmarks/accuracy.py --quick --datasets empiar10017/bin4 --out /tmp/quick.md

This file is not collected by pytest (it is not named ``test_*.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch

from cryomae.baselines.dog import calibrate_dog, dog_pick
from cryomae.config import PickConfig, TrainConfig
from cryomae.device import resolve_device
from cryomae.errors import CryomaeError
from cryomae.evaluation.metrics import Score, evaluate, match_picks
from cryomae.io import MICROGRAPH_SUFFIXES, read_coordinates, read_micrograph
from cryomae.logging import configure_logging
from cryomae.model.checkpoint import TrainedModel
from cryomae.model.presets import PRESETS
from cryomae.picking.picker import pick_micrograph, session_cutoff
from cryomae.preprocess import away_from_edges
from cryomae.training.train import train_model

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = PROJECT_ROOT.parent / "shared" / "data"
DEFAULT_OUT = PROJECT_ROOT / "runs" / "accuracy.md"

# Particle diameters (pixels) of datasets without a dataset.json, from the data README.
KNOWN_DIAMETERS: dict[str, float] = {"empiar10017/bin4": 27.0, "empiar10017/full": 108.0}
N_EXEMPLARS = 15
EXEMPLAR_SEED = 0
ORACLE_QUANTILES = 201  # thresholds tried for the oracle F1: the unique quantiles 0, 0.005, ..., 1 of the scores
QUICK_MAX_QUERIES = 2
QUICK_TRAIN: dict[str, Any] = {"pretrain_epochs": 1, "epochs": 2}
DOG = "DoG"

Points = tuple[np.ndarray, np.ndarray]  # (xy [N, 2], scores [N])


class BenchmarkError(Exception):
    """A problem with the benchmark's options or data layout (reported without a traceback)."""


def say(message: str) -> None:
    """Progress for people, on stdout, flushed at once (the run can take hours)."""
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------ datasets


@dataclass(frozen=True)
class Dataset:
    """One folder of micrographs with per-micrograph ground truth."""

    name: str  # path below the data root, e.g. "empiar10017/bin4"
    root: Path

    def micrographs(self) -> list[Path]:
        """Micrograph files sorted by file name (the protocol's order)."""
        folder = self.root / "micrographs"
        return sorted(
            (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MICROGRAPH_SUFFIXES),
            key=lambda p: p.name,
        )

    def truth_path(self, micrograph: Path) -> Path:
        return self.root / "coords" / f"{micrograph.stem}.star"

    def diameter(self) -> tuple[float, str]:
        """Particle diameter in pixels and where it came from: dataset.json, else the built-in table."""
        meta = self.root / "dataset.json"
        if meta.is_file():
            value = json.loads(meta.read_text()).get("particle_diameter_px")
            if value is not None:
                return float(value), "dataset.json"
        if self.name in KNOWN_DIAMETERS:
            return KNOWN_DIAMETERS[self.name], "data README"
        raise BenchmarkError(
            f"dataset {self.name}: no particle diameter (no 'particle_diameter_px' in {meta} and not in the "
            f"built-in table {sorted(KNOWN_DIAMETERS)})"
        )


def discover_datasets(data_root: Path) -> list[Dataset]:
    """Every folder below ``data_root`` (itself included) that has ``micrographs/`` and ``coords/``."""
    if not data_root.is_dir():
        raise BenchmarkError(f"data root {data_root} is not a folder")
    folders = [data_root, *(p for p in data_root.rglob("*") if p.is_dir())]
    found = [
        Dataset(name=d.relative_to(data_root).as_posix(), root=d)
        for d in folders
        if not any(part.startswith(".") for part in d.relative_to(data_root).parts)
        and (d / "micrographs").is_dir()
        and (d / "coords").is_dir()
    ]
    return sorted(found, key=lambda d: d.name)


@dataclass
class Split:
    """The few-shot protocol on one dataset."""

    diameter: float
    diameter_source: str
    reference: Path
    exemplar_rows: list[int]  # rows of the reference's STAR file
    exemplars_xy: np.ndarray  # [15, 2] original pixels
    queries: list[Path]
    n_queries_available: int
    truth: dict[str, np.ndarray]  # query stem -> [N, 2]

    @property
    def n_truth(self) -> int:
        return sum(len(t) for t in self.truth.values())


def few_shot_split(ds: Dataset, max_queries: int | None, draw: int | None = None) -> Split:
    """Reference = first micrograph by name, 15 exemplars drawn with default_rng(0) (``default_rng(draw)`` for
    another draw), queries = the others."""
    diameter, source = ds.diameter()
    mics = ds.micrographs()
    if len(mics) < 2:
        raise BenchmarkError(f"dataset {ds.name}: needs a reference and at least one query, found {len(mics)}")
    missing = [m.name for m in mics if not ds.truth_path(m).is_file()]
    if missing:
        raise BenchmarkError(f"dataset {ds.name}: no coords/<stem>.star for {', '.join(missing[:5])}")
    gt_ref = read_coordinates(ds.truth_path(mics[0]))
    if len(gt_ref) < N_EXEMPLARS:
        raise BenchmarkError(
            f"dataset {ds.name}: the reference {mics[0].name} has {len(gt_ref)} particles, fewer than {N_EXEMPLARS}"
        )
    seed = EXEMPLAR_SEED if draw is None else draw
    rows = np.random.default_rng(seed).choice(len(gt_ref), N_EXEMPLARS, replace=False)
    queries = mics[1:] if max_queries is None else mics[1 : 1 + max_queries]
    return Split(
        diameter=diameter,
        diameter_source=source,
        reference=mics[0],
        exemplar_rows=[int(r) for r in rows],
        exemplars_xy=gt_ref.xy[rows],
        queries=queries,
        n_queries_available=len(mics) - 1,
        truth={q.stem: read_coordinates(ds.truth_path(q)).xy for q in queries},
    )


# ------------------------------------------------------------------------------------------------- scoring


@dataclass
class Row:
    """One picker's figures on one dataset."""

    picker: str  # "cryomae <preset>" or "DoG"
    precision: float
    recall: float
    f1: float
    tp: int
    n_picks: int
    n_truth: int
    ap: float | None
    n_queries: int
    pick_s_per_micrograph: float  # reading + picking, mean over the queries
    train_s: float | None = None  # wall time of train_model (cryomae) or of calibrate_dog (DoG)
    oracle: dict[str, Any] | None = None  # cryomae only: best F1 over one global threshold (uses the truth)
    details: dict[str, Any] = field(default_factory=dict)
    per_micrograph: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def scored(cls, picker: str, pooled: Score, ap: float | None, n_queries: int, pick_s: float, **rest: Any) -> Row:
        """A row from the pooled scores at the picker's own threshold; ``rest`` are the other fields."""
        return cls(
            picker=picker,
            precision=pooled.precision,
            recall=pooled.recall,
            f1=pooled.f1,
            tp=pooled.tp,
            n_picks=pooled.n_picks,
            n_truth=pooled.n_truth,
            ap=ap,
            n_queries=n_queries,
            pick_s_per_micrograph=pick_s,
            **rest,
        )


@dataclass
class Distractors:
    """What a simulated dataset says beyond its particles (``micrographs_ctf.star``, ``junk.star``)."""

    carbon: dict[str, bool]  # micrograph stem -> shows a carbon edge
    junk: dict[str, np.ndarray]  # micrograph stem -> junk centres [J, 2] (fragments, aggregates, empty micelles)


def distractors(ds: Dataset) -> Distractors | None:
    """The dataset's carbon flags and junk positions, or None where it has no ``micrographs_ctf.star``."""
    import starfile

    ctf = ds.root / "micrographs_ctf.star"
    if not ctf.is_file():
        return None
    table = starfile.read(ctf)
    carbon = {Path(n).stem: bool(c) for n, c in zip(table["rlnMicrographName"], table["simHasCarbon"], strict=True)}
    junk: dict[str, np.ndarray] = {stem: np.zeros((0, 2)) for stem in carbon}
    junk_path = ds.root / "junk.star"
    if junk_path.is_file():
        j = starfile.read(junk_path)
        for name, rows in j.groupby("rlnMicrographName"):
            junk[Path(str(name)).stem] = rows[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=np.float64)
    return Distractors(carbon=carbon, junk=junk)


def distractor_figures(
    picks: dict[str, Points], truth: dict[str, np.ndarray], diameter: float, found: Distractors
) -> dict[str, float | None]:
    """Precision on the micrographs with and without a carbon edge, and the share of picks within half a
    diameter of a junk centre that match no particle."""
    out: dict[str, float | None] = {}
    for key, flag in (("precision_carbon", True), ("precision_no_carbon", False)):
        stems = [k for k in picks if found.carbon.get(k) is flag]
        out[key] = (
            evaluate({k: picks[k] for k in stems}, {k: truth[k] for k in stems}, diameter).pooled.precision
            if stems
            else None
        )
    on_junk = total = 0
    for stem, (xy, scores) in picks.items():
        total += len(xy)
        junk = found.junk.get(stem, np.zeros((0, 2)))
        if len(xy) == 0 or len(junk) == 0:
            continue
        false = ~match_picks(xy, scores, truth[stem], diameter)
        near = np.min(np.linalg.norm(xy[:, None, :] - junk[None], axis=2), axis=1) <= diameter / 2
        on_junk += int(np.sum(false & near))
    out["junk_share"] = on_junk / total if total else None
    return out


def oracle_f1(candidates: dict[str, Points], truth: dict[str, np.ndarray], diameter: float) -> dict[str, Any]:
    """Best pooled F1 over one global threshold on the candidate scores, sweeping their unique quantiles.

    Matching is greedy in descending score, so the picks kept by a threshold (a score prefix, ties kept or
    dropped together) are matched exactly as when matching all candidates: every micrograph is matched once
    and each threshold's TP count is a prefix sum. The winner is re-scored with evaluate() as a check.
    """
    flags_list, scores_list = [], []
    for stem, truth_xy in truth.items():
        xy, scores = candidates.get(stem, (np.zeros((0, 2)), np.zeros(0)))
        flags_list.append(match_picks(xy, scores, truth_xy, diameter))
        scores_list.append(np.asarray(scores, dtype=np.float64))
    scores_all = np.concatenate(scores_list)  # [C]
    flags_all = np.concatenate(flags_list)  # [C]
    n_truth = sum(len(t) for t in truth.values())
    if scores_all.size == 0:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "threshold": None, "n_thresholds": 0}
    order = np.argsort(-scores_all, kind="stable")
    descending = scores_all[order]  # [C]
    tp_prefix = np.concatenate([[0], np.cumsum(flags_all[order])])  # [C + 1]: TP among the top k
    thresholds = np.unique(np.quantile(scores_all, np.linspace(0.0, 1.0, ORACLE_QUANTILES)))  # [T]
    kept = np.searchsorted(-descending, -thresholds, side="right")  # [T]: candidates with score >= threshold
    f1 = 2.0 * tp_prefix[kept] / np.maximum(kept + n_truth, 1)  # [T]
    best = int(np.argmax(f1))
    t = float(thresholds[best])
    check = evaluate(
        {stem: (xy[s >= t], s[s >= t]) for stem, (xy, s) in candidates.items() if stem in truth}, truth, diameter
    ).pooled
    if abs(check.f1 - float(f1[best])) > 1e-9:
        say(f"  warning: oracle F1 from the sweep ({f1[best]:.6f}) differs from evaluate() ({check.f1:.6f})")
    return {
        "f1": check.f1,
        "precision": check.precision,
        "recall": check.recall,
        "tp": check.tp,
        "n_picks": check.n_picks,
        "threshold": t,
        "n_thresholds": len(thresholds),
    }


def _scored(points: dict[str, Points]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The picks in the form evaluate() takes (its scores may be None; ours never are)."""
    return {stem: (xy, scores) for stem, (xy, scores) in points.items()}


def _read_timed(path: Path) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    data = read_micrograph(path).data
    return data, time.perf_counter() - t0


def train_on_split(split: Split, train_cfg: TrainConfig, label: str) -> tuple[TrainedModel, dict[str, Any], float]:
    """Train on the reference with the protocol exemplars: (model, manifest information, wall seconds)."""
    say(f"{label}: training cryomae {train_cfg.preset} on {split.reference.name} ({N_EXEMPLARS} exemplars)")
    reference = read_micrograph(split.reference)
    t0 = time.perf_counter()
    trained, info = train_model(reference, split.exemplars_xy, split.diameter, train_cfg)
    train_s = time.perf_counter() - t0
    say(f"{label}: trained in {train_s:.1f} s")
    return trained, info, train_s


def run_cryomae(
    split: Split,
    preset: str,
    train_cfg: TrainConfig,
    pick_cfg: PickConfig,
    label: str,
    trained_model: tuple[TrainedModel, dict[str, Any], float] | None = None,
) -> Row:
    """Train on the reference (or take ``trained_model`` from ``train_on_split``), pick every query (one
    micrograph in memory at a time), score."""
    trained, info, train_s = trained_model or train_on_split(split, train_cfg, label)
    say(f"{label}: picking {len(split.queries)} queries with cryomae {preset}")

    picks: dict[str, Points] = {}
    candidates: dict[str, Points] = {}
    per_mic: list[dict[str, Any]] = []
    seconds: list[float] = []
    session = session_cutoff(pick_cfg, trained)  # the queries are one session, in file-name order
    for i, path in enumerate(split.queries, 1):
        image, read_s = _read_timed(path)
        result = pick_micrograph(trained, image, pick_cfg, session=session)
        del image
        picks[path.stem] = (result.xy, result.scores)
        candidates[path.stem] = (result.candidates_xy, result.candidate_scores)
        total_s = read_s + result.timings["total"]
        seconds.append(total_s)
        per_mic.append(
            {
                "micrograph": path.name,
                "n_truth": len(split.truth[path.stem]),
                "n_candidates": len(result.candidate_scores),
                "n_picks": len(result.scores),
                "threshold": result.threshold,
                "cutoff_rule": result.cutoff_rule,
                "n_windows": result.n_windows,
                "read_s": read_s,
                "pick_s": result.timings["total"],
                "timings_s": dict(result.timings),
            }
        )
        say(
            f"  [{i}/{len(split.queries)}] {path.name}: {len(result.scores)} picks of {len(result.candidate_scores)} "
            f"candidates, {len(split.truth[path.stem])} truth, {total_s:.1f} s"
        )

    at_threshold = evaluate(_scored(picks), split.truth, split.diameter)
    all_candidates = evaluate(_scored(candidates), split.truth, split.diameter)
    for rec in per_mic:
        rec["score"] = at_threshold.per_micrograph[Path(rec["micrograph"]).stem].to_dict()
    pooled = at_threshold.pooled
    count_errors = [abs(r["n_picks"] - r["n_truth"]) / max(r["n_truth"], 1) for r in per_mic]
    row = Row.scored(
        f"cryomae {preset}",
        pooled,
        all_candidates.average_precision,
        len(split.queries),
        float(np.mean(seconds)),
        train_s=train_s,
        oracle=oracle_f1(candidates, split.truth, split.diameter),
        details={
            "train_config": train_cfg.model_dump(),
            "pick_config": pick_cfg.model_dump(),
            "train_info": {k: info[k] for k in ("timings_s", "final_losses") if k in info},
            "device": info.get("provenance", {}).get("device"),
            "ap_of_picks_at_threshold": at_threshold.average_precision,
            "n_candidates": sum(len(s) for _, s in candidates.values()),
            # the fraction of true particles that some candidate matches (scoring rule, before any cutoff):
            # no cutoff can find the others
            "candidate_recall": all_candidates.pooled.recall,
            # how far the automatic cutoff's pick count is from the truth, per micrograph
            "count_error": {
                "median": float(np.median(count_errors)),
                "min": float(np.min(count_errors)),
                "max": float(np.max(count_errors)),
                "picks_min": min(r["n_picks"] for r in per_mic),
                "picks_max": max(r["n_picks"] for r in per_mic),
                "truth_min": min(r["n_truth"] for r in per_mic),
                "truth_max": max(r["n_truth"] for r in per_mic),
            },
            "pick_s_median": float(np.median(seconds)),
        },
        per_micrograph=per_mic,
    )
    del trained, trained_model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def run_dog(split: Split, label: str) -> Row:
    """The difference-of-Gaussians baseline with its automatic threshold on the same queries.

    As a diagnostic (JSON and a note under the table, not the row's figures) DoG is also scored over all its
    peaks, without a threshold: AP and the oracle F1. Only the thresholded call is timed.
    """
    say(f"{label}: DoG baseline on {len(split.queries)} queries")
    # Tuned on the same few-shot input cryomae gets: polarity and threshold from the 15 exemplars on the
    # reference; picks closer to the edge than cryomae's edge margin (PickConfig.edge_margin) are dropped for both.
    t_cal = time.perf_counter()
    reference, _ = _read_timed(split.reference)
    polarity, threshold = calibrate_dog(reference, split.exemplars_xy, split.diameter)
    del reference
    calibrate_s = time.perf_counter() - t_cal
    margin = PickConfig().edge_margin * split.diameter

    def dog(image: np.ndarray, thr: float) -> Points:
        xy, sc = dog_pick(image, split.diameter, polarity=polarity, threshold=thr)
        keep = away_from_edges(xy, image, margin)
        return xy[keep], sc[keep]

    picks: dict[str, Points] = {}
    peaks: dict[str, Points] = {}
    per_mic: list[dict[str, Any]] = []
    seconds: list[float] = []
    for i, path in enumerate(split.queries, 1):
        image, read_s = _read_timed(path)
        t0 = time.perf_counter()
        xy, scores = dog(image, threshold)
        pick_s = time.perf_counter() - t0
        peaks[path.stem] = dog(image, -np.inf)
        del image
        picks[path.stem] = (xy, scores)
        seconds.append(read_s + pick_s)
        per_mic.append(
            {
                "micrograph": path.name,
                "n_truth": len(split.truth[path.stem]),
                "n_picks": len(scores),
                "n_peaks": len(peaks[path.stem][1]),
                "read_s": read_s,
                "pick_s": pick_s,
            }
        )
        say(f"  [{i}/{len(split.queries)}] {path.name}: {len(scores)} picks, {read_s + pick_s:.1f} s")
    ev = evaluate(_scored(picks), split.truth, split.diameter)
    for rec in per_mic:
        rec["score"] = ev.per_micrograph[Path(rec["micrograph"]).stem].to_dict()
    all_peaks = {
        "n_peaks": sum(len(s) for _, s in peaks.values()),
        "ap": evaluate(_scored(peaks), split.truth, split.diameter).average_precision,
        "oracle": oracle_f1(peaks, split.truth, split.diameter),
    }
    return Row.scored(
        DOG,
        ev.pooled,
        ev.average_precision,
        len(split.queries),
        float(np.mean(seconds)),
        train_s=calibrate_s,
        details={
            "pick_s_median": float(np.median(seconds)),
            "all_peaks": all_peaks,
            "calibration": {"polarity": polarity, "threshold": threshold, "percentile_of_exemplars": 10},
        },
        per_micrograph=per_mic,
    )


# ------------------------------------------------------------------------------------------------- reports


@dataclass
class DatasetResult:
    name: str
    split: Split
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        s = self.split
        return {
            "name": self.name,
            "diameter_px": s.diameter,
            "diameter_source": s.diameter_source,
            "reference": s.reference.name,
            "exemplar_rows": s.exemplar_rows,
            "exemplars_xy": s.exemplars_xy.tolist(),
            "queries": [q.name for q in s.queries],
            "n_queries_available": s.n_queries_available,
            "n_truth": s.n_truth,
            "rows": [asdict(r) for r in self.rows],
        }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def command_line() -> str:
    """The command that produced this run, as it can be pasted into a shell in the working directory."""
    exe = Path(sys.executable)
    cwd = Path.cwd()
    shown = os.path.relpath(exe, cwd) if exe.is_relative_to(cwd) else str(exe)
    return shlex.join([shown, *sys.argv])


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def git_commit() -> str | None:
    """HEAD of the project (read-only; the working tree may hold uncommitted changes)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def markdown_report(meta: dict[str, Any], results: list[DatasetResult], complete: bool) -> str:
    m = meta["machine"]
    cpu = f"{m['processor']}" + (f" ({m['cpu_model']})" if m["cpu_model"] else "")
    cuda = m["cuda_device"] or "none"
    lines = [
        "# Accuracy benchmark: few-shot picking",
        "",
        "Written by `tests/benchmarks/accuracy.py` (see `tests/benchmarks/README.md`); re-run the command below "
        "rather than editing the figures.",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {cpu}, {m['cpu_count']} CPU cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"CUDA device: {cuda}; compute device used: {meta['device']}",
        f"- Commit: {meta['commit'] or 'unknown'} (the working tree may have had uncommitted changes)",
        f"- Command: `{meta['command']}`",
        f"- Data: `{meta['data_root']}`; presets: {', '.join(meta['presets'])}; training overrides: "
        f"`{json.dumps(meta['train_overrides'])}`; picking overrides: `{json.dumps(meta['pick_overrides'])}`; "
        f"max queries: {meta['max_queries'] or 'all'}",
        "",
    ]
    if meta["quick"]:
        lines += [
            f"> **Quick mode** (at most {meta['max_queries']} queries, training overrides "
            f"`{json.dumps(meta['train_overrides'])}`): this only checks that the script runs. The figures below "
            "are not results.",
            "",
        ]
    if not complete:
        lines += [f"> **Incomplete**: {len(results)} of {len(meta['datasets'])} datasets done.", ""]
    lines += [
        "Protocol (data README): micrographs sorted by file name; the first is the reference; 15 exemplars = "
        "`numpy.random.default_rng(0).choice(len(gt_R), 15, replace=False)` over its STAR rows; every other "
        "micrograph is a query. A pick is a true positive when its diameter-sized box has IoU >= 0.5 with a "
        "not-yet-matched ground-truth box; precision, recall and F1 are pooled over the queries.",
        "",
        "- precision / recall / F1: picks at the picker's automatic per-micrograph threshold.",
        "- AP: area under the pooled precision-recall curve (non-interpolated); for cryomae over **all** "
        "candidates (every peak of the score map), for DoG over its thresholded picks.",
        "- oracle F1: the best pooled F1 over one global threshold on the cryomae candidate scores "
        f"(sweeping their unique quantiles, {ORACLE_QUANTILES} values). It chooses the threshold **with the ground "
        "truth**: an upper bound for the automatic threshold, **not a result**.",
        "- train s: wall time of `train_model` (preparation, pre-training, SCS training, exemplar bank). "
        "pick s/micrograph: reading the micrograph plus `pick_micrograph`'s own timing (DoG: reading plus "
        "`dog_pick`), mean over the queries.",
        "- DoG: tuned on the same few-shot input as cryomae: polarity and threshold from its response at the 15 "
        "exemplars on the reference (threshold = their 10th percentile; its train s is this calibration); picks "
        f"closer than {PickConfig().edge_margin:g} particle diameters to the edge are dropped for both pickers.",
        "",
    ]
    header = (
        "| picker | precision | recall | F1 | AP | oracle F1 (upper bound) | train s | pick s/micrograph "
        "| n queries | n truth | n picks |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for res in results:
        s = res.split
        lines += [
            f"## {res.name}",
            "",
            f"Particle diameter {s.diameter:.2f} px ({s.diameter_source}); reference `{s.reference.name}`; "
            f"{len(s.queries)} of {s.n_queries_available} queries; {s.n_truth} ground-truth particles on them.",
            "",
            header,
            rule,
        ]
        for r in res.rows:
            oracle = _fmt(r.oracle["f1"]) if r.oracle else "—"
            lines.append(
                f"| {r.picker} | {_fmt(r.precision)} | {_fmt(r.recall)} | {_fmt(r.f1)} | {_fmt(r.ap)} | {oracle} "
                f"| {_fmt(r.train_s, 1)} | {_fmt(r.pick_s_per_micrograph, 2)} | {r.n_queries} | {r.n_truth} "
                f"| {r.n_picks} |"
            )
        for r in res.rows:
            if r.oracle and r.oracle.get("threshold") is not None:
                lines.append("")
                lines.append(
                    f"Oracle for {r.picker} (uses the ground truth): threshold {r.oracle['threshold']:.4f} gives "
                    f"precision {r.oracle['precision']:.3f}, recall {r.oracle['recall']:.3f}, "
                    f"F1 {r.oracle['f1']:.3f}."
                )
            recall = r.details.get("candidate_recall")
            counts = r.details.get("count_error")
            if recall is not None and counts is not None:
                lines.append("")
                lines.append(
                    f"{r.picker} candidates: recall {recall:.3f} (true particles that some candidate matches, before "
                    f"any cutoff). Picks per micrograph {counts['picks_min']}-{counts['picks_max']} against "
                    f"{counts['truth_min']}-{counts['truth_max']} true: |picks - truth| / truth median "
                    f"{counts['median']:.2f} (range {counts['min']:.2f}-{counts['max']:.2f})."
                )
            peaks = r.details.get("all_peaks")
            if peaks:
                lines.append("")
                lines.append(
                    f"{r.picker} over all its {peaks['n_peaks']} peaks, without its threshold (a diagnostic): "
                    f"AP {_fmt(peaks['ap'])}; best F1 over one global threshold (uses the ground truth) "
                    f"{_fmt(peaks['oracle']['f1'])}."
                )
        lines.append("")

    if results:
        names = [res.name for res in results]
        pickers: list[str] = []
        for res in results:
            pickers += [r.picker for r in res.rows if r.picker not in pickers]
        lines += [
            "## Summary",
            "",
            "F1 / AP per dataset (cryomae at its automatic threshold, AP over all candidates); the oracle rows "
            "use the ground truth to choose the threshold and are upper bounds, not results.",
            "",
            "| picker | " + " | ".join(names) + " | mean F1 | mean AP |",
            "|---|" + "---:|" * (len(names) + 2),
        ]

        def summary_row(label: str, cells: list[tuple[float, float | None] | None]) -> str:
            f1s = [c[0] for c in cells if c is not None]
            aps = [c[1] for c in cells if c is not None and c[1] is not None]
            shown = ["—" if c is None else f"{c[0]:.3f} / {_fmt(c[1])}" for c in cells]
            mean_f1 = _fmt(float(np.mean(f1s))) if len(f1s) == len(cells) else "—"
            mean_ap = _fmt(float(np.mean(aps))) if len(aps) == len(cells) else "—"
            return f"| {label} | " + " | ".join(shown) + f" | {mean_f1} | {mean_ap} |"

        for picker in pickers:
            by_ds = [next((r for r in res.rows if r.picker == picker), None) for res in results]
            lines.append(summary_row(picker, [None if r is None else (r.f1, r.ap) for r in by_ds]))
        for picker in pickers:
            by_ds = [next((r for r in res.rows if r.picker == picker), None) for res in results]
            if any(r is not None and r.oracle for r in by_ds):
                cells: list[tuple[float, float | None] | None] = [
                    None if r is None or not r.oracle else (float(r.oracle["f1"]), None) for r in by_ds
                ]
                label = f"oracle F1, {picker} (upper bound)"
                shown = ["—" if c is None else _fmt(c[0]) for c in cells]
                f1s = [c[0] for c in cells if c is not None]
                mean_f1 = _fmt(float(np.mean(f1s))) if len(f1s) == len(cells) else "—"
                lines.append(f"| {label} | " + " | ".join(shown) + f" | {mean_f1} | — |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(
    meta: dict[str, Any], results: list[DatasetResult], complete: bool, out: Path | None, json_path: Path | None
) -> None:
    """(Re)write the report and the JSON; called after every dataset so a stopped run keeps its figures."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown_report(meta, results, complete))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": meta, "complete": complete, "datasets": [r.to_dict() for r in results]}
        json_path.write_text(json.dumps(doc, indent=1, default=float) + "\n")


# ---------------------------------------------------------------------------------------------------- main


def _pairs(values: Sequence[str], option: str) -> dict[str, Any]:
    """KEY=VALUE pairs; a value is JSON when it parses as JSON, else the plain string (as the CLI's --set)."""
    out: dict[str, Any] = {}
    for pair in values:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BenchmarkError(f"{option} expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="accuracy.py",
        description="Few-shot accuracy benchmark of the cryomae picker (and a DoG baseline) on the development data.",
    )
    p.add_argument(
        "--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder of datasets (default: ../shared/data)"
    )
    p.add_argument(
        "--datasets", type=_comma_list, default=None, help="comma list, e.g. empiar10017/bin4,sim/apoferritin (all)"
    )
    p.add_argument("--presets", type=_comma_list, default=["fast"], help="comma list of presets (default: fast)")
    p.add_argument(
        "--set", dest="train_set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override"
    )
    p.add_argument("--pick-set", action="append", default=[], metavar="KEY=VALUE", help="PickConfig override")
    p.add_argument("--max-queries", type=_positive_int, default=None, help="use only the first N queries")
    p.add_argument(
        "--quick",
        action="store_true",
        help="check that the script runs: --max-queries 2, pretrain_epochs=1, epochs=2 (explicit options win); "
        "without --out the report is printed, not written to docs/",
    )
    p.add_argument("--device", default="auto", help="torch device for training and picking (default: auto)")
    p.add_argument("--out", type=Path, default=None, help="Markdown report (default: runs/accuracy.md)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    p.add_argument("--verbose", action="store_true", help="show the library's INFO log lines")
    return p


def run(args: argparse.Namespace) -> int:
    train_overrides = {**(QUICK_TRAIN if args.quick else {}), **_pairs(args.train_set, "--set")}
    pick_overrides = _pairs(args.pick_set, "--pick-set")
    if "preset" in train_overrides:
        raise BenchmarkError("choose presets with --presets, not --set preset=...")
    max_queries = args.max_queries if args.max_queries is not None else (QUICK_MAX_QUERIES if args.quick else None)
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown or not args.presets:
        raise BenchmarkError(f"unknown preset(s) {unknown or args.presets}; choose from {', '.join(PRESETS)}")

    # Validate every configuration before spending time on data.
    train_cfgs = {p: TrainConfig(**{"preset": p, "device": args.device, **train_overrides}) for p in args.presets}
    pick_cfg = PickConfig(**{"device": args.device, **pick_overrides})

    data_root = args.data_root.resolve()
    available = {d.name: d for d in discover_datasets(data_root)}
    if not available:
        raise BenchmarkError(f"no dataset (folder with micrographs/ and coords/) under {data_root}")
    names = args.datasets if args.datasets is not None else sorted(available)
    missing = [n for n in names if n not in available]
    if missing or not names:
        raise BenchmarkError(f"unknown dataset(s) {missing or names}; found: {', '.join(sorted(available))}")
    datasets = [available[n] for n in names]
    for ds in datasets:
        ds.diameter()  # fail now, not after hours, when a diameter is missing

    out: Path | None = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    device = resolve_device(args.device)
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "cwd": str(Path.cwd()),
        "commit": git_commit(),
        "machine": machine(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "data_root": str(data_root),
        "datasets": names,
        "presets": list(args.presets),
        "train_overrides": train_overrides,
        "pick_overrides": pick_overrides,
        "max_queries": max_queries,
        "quick": bool(args.quick),
        "n_exemplars": N_EXEMPLARS,
        "exemplar_seed": EXEMPLAR_SEED,
        "oracle_quantiles": ORACLE_QUANTILES,
    }
    say(f"accuracy benchmark: {len(datasets)} dataset(s) x presets {', '.join(args.presets)} + DoG on {device}")

    results: list[DatasetResult] = []
    t_start = time.perf_counter()
    for ds in datasets:
        split = few_shot_split(ds, max_queries)
        say(
            f"== {ds.name}: diameter {split.diameter:.2f} px, reference {split.reference.name}, "
            f"{len(split.queries)}/{split.n_queries_available} queries, {split.n_truth} truth"
        )
        res = DatasetResult(ds.name, split)
        for preset in args.presets:
            row = run_cryomae(split, preset, train_cfgs[preset], pick_cfg, ds.name)
            res.rows.append(row)
            say(result_line(ds.name, row))
        row = run_dog(split, ds.name)
        res.rows.append(row)
        say(result_line(ds.name, row))
        results.append(res)
        write_outputs(meta, results, len(results) == len(datasets), out, args.json)

    meta["total_s"] = time.perf_counter() - t_start
    write_outputs(meta, results, True, out, args.json)
    report = markdown_report(meta, results, True)
    if out is None:
        say("\n" + report)
    else:
        say(f"report written to {out}")
    if args.json is not None:
        say(f"figures written to {args.json}")
    say(f"done in {meta['total_s']:.0f} s")
    return 0


def result_line(dataset: str, r: Row) -> str:
    oracle = f" oracleF1={r.oracle['f1']:.3f}" if r.oracle else ""
    train = f" train={r.train_s:.1f}s" if r.train_s is not None else ""
    return (
        f"RESULT {dataset} {r.picker}: P={r.precision:.3f} R={r.recall:.3f} F1={r.f1:.3f} AP={_fmt(r.ap)}{oracle}"
        f"{train} pick={r.pick_s_per_micrograph:.2f}s/micrograph queries={r.n_queries} truth={r.n_truth} "
        f"picks={r.n_picks}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("INFO" if args.verbose else "WARNING")
    try:
        return run(args)
    except (BenchmarkError, CryomaeError, pydantic.ValidationError) as exc:
        print(f"accuracy.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
