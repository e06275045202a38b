"""File-level workflows behind the offline CLI: read inputs, call the library, write outputs.

Output layout of a pick run (RELION conventions, see README "Output files"):
  OUT/<stem>_autopick.star              picks above the per-micrograph cutoff (loop, always)
  OUT/autopick.star                      data_coordinate_files index: micrograph name -> coordinate file
  OUT/particles.star                     every pick of the run with its micrograph name and model version
  OUT/candidates/<stem>_candidates.star  every scored candidate, for re-thresholding and ranking metrics
  OUT/pick_run.json                      model, options, per-micrograph thresholds, counts and timings
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from cryomae.config import PickConfig, TrainConfig
from cryomae.errors import InputError
from cryomae.evaluation.metrics import Evaluation, evaluate
from cryomae.io.atomic import write_json
from cryomae.io.coordinates import Coordinates, check_exemplars, read_coordinates
from cryomae.io.micrographs import read_ahead, read_micrograph, write_mrc
from cryomae.io.writers import (
    AUTOPICK_SUFFIX,
    write_autopick_star,
    write_coordinate_index,
    write_coordinates,
    write_particles_star,
)

log = structlog.get_logger("cryomae.operator.workflows")
RUN_FILE = "pick_run.json"
CANDIDATES_DIR = "candidates"


def train_from_files(
    reference: Path,
    coords: Path,
    diameter: float,
    out: Path,
    cfg: TrainConfig,
    unlabeled: Sequence[Path] = (),
) -> Path:
    """Validate the inputs, train, and write a model directory."""
    # torch only in the commands that compute with it (train, pick, example): evaluate and preview start without
    from cryomae.model.checkpoint import save_model
    from cryomae.training.train import train_model

    mic = read_micrograph(reference)
    ex = read_coordinates(coords)
    for warning in check_exemplars(ex, mic.shape, coords):
        log.warning("exemplars", warning=warning)
    extra = [read_micrograph(p) for p in unlabeled]
    trained, info = train_model(mic, ex.xy, diameter, cfg, extra)
    info["provenance"]["exemplar_file"] = str(coords)
    return save_model(
        out, trained.model, trained.bank, trained.geometry, info, head=trained.head, negatives=trained.negatives
    )


def pick_files(model_dir: Path, micrographs: Sequence[Path], out: Path, cfg: PickConfig) -> dict[str, Any]:
    """Pick every micrograph and write the RELION outputs; returns the run summary (also pick_run.json).

    A micrograph that cannot be read is reported and skipped; the others are still picked and written.
    """
    from cryomae.device import resolve_device
    from cryomae.model.checkpoint import load_model
    from cryomae.picking.picker import pick_micrograph, session_cutoff

    stems: dict[str, Path] = {}
    for path in micrographs:
        if path.stem in stems:
            raise InputError(
                path,
                f"has the same name stem as {stems[path.stem]}; their output files would collide "
                "(pick them into separate output folders)",
            )
        stems[path.stem] = path
    trained = load_model(model_dir, resolve_device(cfg.device))
    out.mkdir(parents=True, exist_ok=True)
    (out / CANDIDATES_DIR).mkdir(exist_ok=True)
    version = trained.manifest.get("weights", {}).get("sha256", "")[:12]
    session = session_cutoff(cfg, trained)  # the micrographs of one run are one session
    rows: list[dict[str, Any]] = []
    index: list[tuple[str, str]] = []
    names: list[str] = []
    all_xy: list[np.ndarray] = []
    all_scores: list[np.ndarray] = []
    failed: list[dict[str, str]] = []
    for path, mic in read_ahead(micrographs):  # the next file is decoded while this one is picked
        if isinstance(mic, InputError):
            log.error("micrograph_unreadable", micrograph=str(path), error=str(mic))
            failed.append({"micrograph": str(path), "error": str(mic)})
            continue
        try:
            result = pick_micrograph(trained, mic.data, cfg, session=session)
        except InputError as exc:  # smaller than one picking window
            problem = str(exc.located(path))
            log.error("micrograph_unpickable", micrograph=str(path), error=problem)
            failed.append({"micrograph": str(path), "error": problem})
            continue
        stem = path.stem
        star = out / f"{stem}{AUTOPICK_SUFFIX}"
        write_autopick_star(star, result.xy, result.scores)
        write_coordinates(
            out / CANDIDATES_DIR / f"{stem}_candidates.star", Coordinates(result.candidates_xy, result.candidate_scores)
        )
        index.append((str(path), str(star)))
        names += [str(path)] * len(result.xy)
        all_xy.append(result.xy)
        all_scores.append(result.scores)
        rows.append(
            {
                "micrograph": str(path),
                "picks": len(result.xy),
                "candidates": len(result.candidate_scores),
                "threshold": result.threshold,
                "cutoff_rule": result.cutoff_rule,
                "windows": result.n_windows,
                "seconds": round(result.timings["total"], 3),
            }
        )
        log.info(
            "picked",
            micrograph=path.name,
            picks=len(result.xy),
            threshold=round(result.threshold, 4),
            seconds=round(result.timings["total"], 3),
        )
    write_coordinate_index(out / "autopick.star", index)
    xy = np.concatenate(all_xy) if all_xy else np.zeros((0, 2))
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    write_particles_star(
        out / "particles.star", names, xy, scores, extra={"cryomaeModelVersion": [version] * len(names)}
    )
    summary = {
        "model": str(model_dir),
        "model_version": version,
        "diameter": trained.geometry.diameter,
        "options": cfg.model_dump(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "micrographs": rows,
        "failed": failed,
        "total_picks": len(xy),
    }
    write_json(out / RUN_FILE, summary, indent=2)
    if failed and not rows:
        raise InputError(failed[0]["micrograph"], f"no micrograph could be read ({failed[0]['error']})")
    return summary


def _stem_of_autopick(path: Path) -> str:
    return path.name[: -len(AUTOPICK_SUFFIX)]


def evaluate_dirs(picks: Path, truth: Path, diameter: float, iou: float = 0.5) -> Evaluation:
    """Score a pick directory against a directory of ground-truth STAR files named <stem>.star."""
    files = sorted(picks.glob(f"*{AUTOPICK_SUFFIX}"))
    if not files:
        raise InputError(picks, f"no *{AUTOPICK_SUFFIX} files found")
    found: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    gt: dict[str, np.ndarray] = {}
    ranking: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for f in files:
        stem = _stem_of_autopick(f)
        tfile = truth / f"{stem}.star"
        if not tfile.is_file():
            raise InputError(tfile, f"no ground truth for picked micrograph {stem}")
        c = read_coordinates(f)
        found[stem] = (c.xy, c.scores)
        gt[stem] = read_coordinates(tfile).xy
        cand = picks / CANDIDATES_DIR / f"{stem}_candidates.star"
        if cand.is_file():
            cc = read_coordinates(cand)
            ranking[stem] = (cc.xy, cc.scores)
    ev = evaluate(found, gt, diameter, iou)
    if len(ranking) == len(found):
        ev = dataclasses.replace(ev, average_precision=evaluate(ranking, gt, diameter, iou).average_precision)
    return ev


def preview_file(
    micrograph: Path,
    picks: Path,
    out: Path,
    truth: Path | None = None,
    diameter: float | None = None,
    size: int = 1024,
    legend: bool = True,
) -> Path:
    """Draw a pick file (and ground truth) on a micrograph; diameter from pick_run.json when not given.

    For the picks of ``cryomae pick`` (pick_run.json beside them), the micrograph's candidates just below its
    cutoff are drawn too, in the rejected colour.
    """
    from cryomae.gallery.render import near_cutoff, render_preview

    for path, what in ((micrograph, "micrograph"), (picks, "pick file"), (truth, "ground-truth file")):
        if path is not None and not Path(path).is_file():
            raise InputError(path, f"{what} not found")
    run_file = picks.parent / RUN_FILE
    run: dict[str, Any] = json.loads(run_file.read_text()) if run_file.is_file() else {}
    if diameter is None:
        if not run:
            raise InputError(picks, f"give --diameter (no {RUN_FILE} beside the picks to read it from)")
        diameter = float(run["diameter"])
    mic = read_micrograph(micrograph)
    kept = read_coordinates(picks).xy
    t = read_coordinates(truth).xy if truth is not None else None
    rejected = None
    row = next((r for r in run.get("micrographs", []) if Path(r["micrograph"]).name == micrograph.name), None)
    candidates = picks.parent / CANDIDATES_DIR / f"{micrograph.stem}_candidates.star"
    if row is not None and candidates.is_file():
        c = read_coordinates(candidates)
        if c.scores is not None:
            rejected = c.xy[near_cutoff(c.scores, float(row["threshold"]))]
    return render_preview(mic.data, kept, diameter, out, truth_xy=t, max_size=size, rejected_xy=rejected, legend=legend)


def make_example_data(out: Path, n_micrographs: int = 4, seed: int = 0, diameter: float = 24.0) -> list[Path]:
    """Write synthetic MRC micrographs and their ground-truth STAR files under out/micrographs, out/coords."""
    from cryomae.synthetic import make_micrograph

    (out / "micrographs").mkdir(parents=True, exist_ok=True)
    (out / "coords").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_micrographs):
        m = make_micrograph(diameter=diameter, seed=seed * 1000 + i)
        p = out / "micrographs" / f"synthetic_{i:03d}.mrc"
        write_mrc(p, m.image, pixel_size=2.0)
        write_coordinates(out / "coords" / f"synthetic_{i:03d}.star", Coordinates(m.centres))
        paths.append(p)
    return paths


def run_example(out: Path, preset: str = "fast", seed: int = 0) -> dict[str, Any]:
    """The built-in example end to end: synthetic data, train on 15 exemplars, pick, evaluate, preview."""
    diameter = 24.0
    mics = make_example_data(out / "data", seed=seed, diameter=diameter)
    truth0 = read_coordinates(out / "data" / "coords" / f"{mics[0].stem}.star")
    chosen = np.random.default_rng(seed).choice(len(truth0), 15, replace=False)
    ex_file = out / "exemplars.star"
    write_coordinates(ex_file, Coordinates(truth0.xy[chosen]))
    # The synthetic particles are small elongated shapes among dark distractors: 1.5 diameters of context
    # suit them better than the default region (1 diameter) measured on real and simulated micrographs.
    cfg = TrainConfig(preset=preset, seed=seed, box_factor=1.5)
    model_dir = train_from_files(mics[0], ex_file, diameter, out / "model", cfg)
    pick_files(model_dir, mics[1:], out / "picks", PickConfig())
    ev = evaluate_dirs(out / "picks", out / "data" / "coords", diameter)
    write_json(out / "evaluation.json", ev.to_dict(), indent=2)
    preview_file(
        mics[1],
        out / "picks" / f"{mics[1].stem}{AUTOPICK_SUFFIX}",
        out / "preview.png",
        out / "data" / "coords" / f"{mics[1].stem}.star",
    )
    return {"evaluation": ev, "table": ev.format_table()}
