"""Candidate and cutoff study: train once per dataset, keep the score maps, then try picking rules in seconds.

The accuracy benchmark retrains and re-scores everything for each setting (10+ minutes for the 8 development
sets). The rules that act after the score map (peak finding, edge and carbon masks, the per-micrograph cutoff)
do not change the map, so this study computes it once per micrograph (reference included) and caches it with
the trained model; ``evaluate`` then scores any ``PickConfig`` (and any cutoff rule) on every dataset:
candidate recall, AP, the best single global cutoff's F1, F1 at the rule's own cutoff and the per-micrograph
count error, with their means over the sets.

    .venv/bin/python tests/benchmarks/study.py prepare               # trains and caches (about 5 minutes)
    .venv/bin/python tests/benchmarks/study.py evaluate --pick-set edge_margin=0.5 --out /tmp/table.md

The cache (default ``.study/`` in the project root, ignored by git) holds one folder per dataset; a training
variant (``prepare --train-set lowpass=2.0``) or a score-map variant (``prepare --pick-set score=max``) needs a
cache of its own (``--cache .study/lowpass2``). docs/accuracy-study.md has what was measured with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryomae.config import PickConfig, TrainConfig
from cryomae.evaluation.metrics import evaluate
from cryomae.io import read_micrograph
from cryomae.model.checkpoint import TrainedModel, load_model, save_model
from cryomae.picking.picker import ScoreMap, _cutoff, compute_score_map, find_candidates, session_cutoff
from cryomae.training.train import train_model
from tests.benchmarks import accuracy
from tests.benchmarks.accuracy import (
    DEFAULT_DATA_ROOT,
    PROJECT_ROOT,
    Split,
    _pairs,
    discover_datasets,
    few_shot_split,
    oracle_f1,
)

DEFAULT_CACHE = PROJECT_ROOT / ".study"
Points = tuple[np.ndarray, np.ndarray]


@dataclass
class Cached:
    """One dataset: its split, trained model and every micrograph's score map (reference included)."""

    name: str
    split: Split
    trained: TrainedModel
    maps: dict[str, ScoreMap]  # micrograph stem -> score map
    images: dict[str, np.ndarray]  # stem -> the micrograph (float16), for the edge and padded-border test


def _folder(cache: Path, name: str) -> Path:
    return cache / name.replace("/", "__")


def _split(ds: Any, cache: Path) -> Split:
    """The protocol's split with the cache's exemplar count (``study.json``; the protocol's 15 by default)."""
    meta = cache / "study.json"
    n = json.loads(meta.read_text())["exemplars"] if meta.is_file() else accuracy.N_EXEMPLARS
    saved, accuracy.N_EXEMPLARS = accuracy.N_EXEMPLARS, n
    try:
        return few_shot_split(ds, None)
    finally:
        accuracy.N_EXEMPLARS = saved


def prepare(
    data_root: Path,
    cache: Path,
    names: Sequence[str] | None,
    train_cfg: TrainConfig,
    map_cfg: PickConfig,
    exemplars: int | None = None,
) -> None:
    """Train (unless cached) and score every micrograph of each dataset; ``map_cfg`` holds the options that shape
    the score map itself (``score``, ``feature_norm``, ``stride_fraction``): give ``evaluate`` the same ones.
    ``exemplars`` draws that many exemplars instead of the protocol's 15 (kept with the cache)."""
    cache.mkdir(parents=True, exist_ok=True)
    if exemplars is not None:
        (cache / "study.json").write_text(json.dumps({"exemplars": exemplars}))
    for ds in discover_datasets(data_root):
        if names and ds.name not in names:
            continue
        folder = _folder(cache, ds.name)
        split = _split(ds, cache)
        if not (folder / "model" / "manifest.json").is_file():
            t0 = time.perf_counter()
            trained, info = train_model(read_micrograph(split.reference), split.exemplars_xy, split.diameter, train_cfg)
            save_model(folder / "model", trained.model, trained.bank, trained.geometry, info)
            print(f"{ds.name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        trained = load_model(folder / "model")
        for path in [split.reference, *split.queries]:
            out = folder / "maps" / f"{path.stem}.npz"
            if out.is_file():
                continue
            image = read_micrograph(path).data
            smap = compute_score_map(trained, image, map_cfg)
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                out,
                scores=smap.scores,
                level=smap.level if smap.level is not None else np.zeros(0),
                stride=smap.stride,
                offset=smap.offset,
                image=np.asarray(image, dtype=np.float16),
            )
        print(f"{ds.name}: {len(split.queries) + 1} score maps cached", flush=True)


def load(data_root: Path, cache: Path, names: Sequence[str] | None = None) -> list[Cached]:
    out = []
    for ds in discover_datasets(data_root):
        if names and ds.name not in names:
            continue
        folder = _folder(cache, ds.name)
        if not (folder / "model" / "manifest.json").is_file():
            continue
        split = _split(ds, cache)
        maps, images = {}, {}
        for path in [split.reference, *split.queries]:
            with np.load(folder / "maps" / f"{path.stem}.npz") as z:
                maps[path.stem] = ScoreMap(
                    scores=z["scores"], stride=int(z["stride"]), offset=float(z["offset"]), level=z["level"]
                )
                images[path.stem] = z["image"]
        out.append(Cached(ds.name, split, load_model(folder / "model"), maps, images))
    return out


CutoffRule = Callable[[Cached, dict[str, Points], PickConfig], dict[str, float]]


def default_rule(c: Cached, cands: dict[str, Points], cfg: PickConfig) -> dict[str, float]:
    """The picker's own cutoff: the queries are one session in file-name order, its ``auto`` cutoff seeded by
    the reference's (as training measures it, here from the cached reference map)."""
    session = session_cutoff(cfg)
    if cfg.threshold == "auto":
        cut, rule = session_cutoff(cfg).cut(cands[c.split.reference.stem][1])
        if rule == "gmm":
            session.history.append(cut)  # the seed
    return {q.stem: _cutoff(cands[q.stem][1], cfg, session)[0] for q in c.split.queries}


def candidates(c: Cached, cfg: PickConfig) -> dict[str, Points]:
    """Every micrograph's candidates (reference included) under cfg."""
    return {stem: find_candidates(m, c.trained.geometry, c.images[stem], cfg) for stem, m in c.maps.items()}


def score(c: Cached, cfg: PickConfig, rule: CutoffRule = default_rule) -> dict[str, Any]:
    cands = candidates(c, cfg)
    cuts = rule(c, cands, cfg)
    queries = {q.stem: cands[q.stem] for q in c.split.queries}
    truth, d = c.split.truth, c.split.diameter
    everything = evaluate(dict(queries), truth, d)
    picks = {k: (xy[s >= cuts[k]], s[s >= cuts[k]]) for k, (xy, s) in queries.items()}
    at_cut = evaluate(picks, truth, d).pooled
    oracle = oracle_f1(queries, truth, d)
    errors = [abs(len(picks[k][1]) - len(truth[k])) / max(len(truth[k]), 1) for k in queries]
    return {
        "recall": everything.pooled.recall,
        "ap": everything.average_precision,
        "oracle": oracle["f1"],
        "f1": at_cut.f1,
        "ratio": at_cut.f1 / max(oracle["f1"], 1e-9),
        "count_err": float(np.median(errors)),
        "picks": [len(picks[k][1]) for k in queries],
        "truth": [len(truth[k]) for k in queries],
    }


KEYS = ("recall", "ap", "oracle", "f1", "ratio", "count_err")


def table(cached: list[Cached], cfg: PickConfig, rule: CutoffRule = default_rule, quiet: bool = False) -> dict:
    rows = {c.name: score(c, cfg, rule) for c in cached}
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in KEYS}
    if not quiet:
        print(f"{'dataset':22s}" + "".join(f"{k:>10s}" for k in KEYS))
        for name, r in rows.items():
            print(f"{name:22s}" + "".join(f"{r[k]:10.3f}" for k in KEYS))
        print(f"{'mean':22s}" + "".join(f"{mean[k]:10.3f}" for k in KEYS))
    return {"rows": rows, "mean": mean}


def markdown(result: dict[str, Any], command: str) -> str:
    """The table of ``table`` as Markdown, with the command that made it."""
    lines = [
        f"Command: `{command}`",
        "",
        "| dataset | candidate recall | AP | best global-cutoff F1 | F1 at the automatic cutoff | ratio | "
        "median count error |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in [*result["rows"].items(), ("**mean**", result["mean"])]:
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("prepare", "evaluate"))
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--datasets", default=None, help="comma list (default: all)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pick-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the table as Markdown here")
    p.add_argument("--exemplars", type=int, default=None, help="prepare: exemplars per reference (default 15)")
    args = p.parse_args(argv)
    names = args.datasets.split(",") if args.datasets else None
    if args.action == "prepare":
        train_cfg = TrainConfig(**_pairs(args.train_set, "--train-set"))
        map_cfg = PickConfig(**_pairs(args.pick_set, "--pick-set"))
        prepare(args.data_root, args.cache, names, train_cfg, map_cfg, args.exemplars)
        return 0
    cached = load(args.data_root, args.cache, names)
    result = table(cached, PickConfig(**_pairs(args.pick_set, "--pick-set")))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.out:
        command = " ".join([".venv/bin/python tests/benchmarks/study.py", *(argv or sys.argv[1:])])
        args.out.write_text(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
