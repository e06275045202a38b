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

``choose`` decides a free choice leaving one sample out (issue 24): every combination of the ``--grid`` values is
scored on the cached maps, and ``loso.py`` reports, per held-out sample, the variant chosen on the other samples
and its F1 at the automatic cutoff beside the in-sample choice's. One cache per exemplar draw
(``prepare --draw N --cache .study/draw-N``) gives mean and minimum over the draws:

    .venv/bin/python tests/benchmarks/study.py choose --grid threshold=auto,gmm,robust --grid nms_distance=0.4,0.3

``compare`` sets training variants against each other the same way, each prepared in caches of its own
(``prepare --train-set pretrain_epochs=0 --train-set epochs=0 --draw N --cache .study/untrained-N``):

    .venv/bin/python tests/benchmarks/study.py compare --variant "trained=.study/draw-0,.study/draw-1" \
        --variant "untrained=.study/untrained-0,.study/untrained-1"
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryomae.config import PickConfig, TrainConfig
from cryomae.evaluation.metrics import evaluate
from cryomae.io import read_micrograph
from cryomae.model.checkpoint import TrainedModel, load_model, save_model
from cryomae.picking import blobs
from cryomae.picking.picker import (
    ScoreMap,
    _cutoff,
    compute_score_map,
    find_candidates,
    session_cutoff,
    uses_head,
)
from cryomae.training.pu_head import train_head
from cryomae.training.train import train_model
from tests.benchmarks import accuracy, loso
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
    distractors: accuracy.Distractors | None = None  # carbon flags and junk (simulated data only)


def _folder(cache: Path, name: str) -> Path:
    return cache / name.replace("/", "__")


def _meta(cache: Path) -> dict[str, Any]:
    """What ``prepare`` recorded about a cache's exemplars (``study.json``): their count and draw, if not the
    protocol's."""
    meta = cache / "study.json"
    return dict(json.loads(meta.read_text())) if meta.is_file() else {}


def _split(ds: Any, cache: Path) -> Split:
    """The protocol's split with the cache's exemplar count and draw (``study.json``; by default the protocol's
    15 exemplars drawn with ``default_rng(0)``)."""
    meta = _meta(cache)
    saved = accuracy.N_EXEMPLARS, accuracy.EXEMPLAR_SEED
    accuracy.N_EXEMPLARS = meta.get("exemplars", accuracy.N_EXEMPLARS)
    accuracy.EXEMPLAR_SEED = meta.get("draw", accuracy.EXEMPLAR_SEED)
    try:
        return few_shot_split(ds, None)
    finally:
        accuracy.N_EXEMPLARS, accuracy.EXEMPLAR_SEED = saved


def _record(cache: Path, exemplars: int | None, draw: int | None) -> None:
    """Keep a non-default exemplar count or draw with the cache; a cache whose models were trained on another
    draw is refused (its score maps belong to the exemplars they were trained on)."""
    meta = _meta(cache)
    recorded = meta.get("draw", accuracy.EXEMPLAR_SEED)
    if draw is not None and draw != recorded and any(cache.glob("*/model/manifest.json")):
        raise accuracy.BenchmarkError(
            f"{cache} holds models trained on draw {recorded}, not {draw}: give each draw a cache of its own (--cache)"
        )
    want = {**meta}
    if exemplars is not None:
        want["exemplars"] = exemplars
    if draw is not None:
        want["draw"] = draw
    if want != meta:
        (cache / "study.json").write_text(json.dumps(want))


def prepare(
    data_root: Path,
    cache: Path,
    names: Sequence[str] | None,
    train_cfg: TrainConfig,
    map_cfg: PickConfig,
    exemplars: int | None = None,
    draw: int | None = None,
    models_from: Path | None = None,
) -> None:
    """Train (unless cached) and score every micrograph of each dataset; ``map_cfg`` holds the options that shape
    the score map itself (``score``, ``feature_norm``, ``stride_fraction``): give ``evaluate`` the same ones.
    ``exemplars`` draws that many exemplars instead of the protocol's 15, ``draw`` draws them with
    ``default_rng(draw)`` instead of the protocol's ``default_rng(0)`` (both kept with the cache)."""
    cache.mkdir(parents=True, exist_ok=True)
    _record(cache, exemplars, draw)
    for ds in discover_datasets(data_root):
        if names and ds.name not in names:
            continue
        folder = _folder(cache, ds.name)
        split = _split(ds, cache)
        if not (folder / "model" / "manifest.json").is_file() and models_from is not None:
            # the encoder and bank of another cache (same exemplars), the particle head trained anew
            t0 = time.perf_counter()
            trained = load_model(_folder(models_from, ds.name) / "model")
            trained.head = train_head(
                trained, read_micrograph(split.reference).data, split.exemplars_xy, train_cfg, torch.device("cpu")
            )
            info = {k: v for k, v in trained.manifest.items() if k in ("hyperparameters", "provenance", "calibration")}
            save_model(folder / "model", trained.model, trained.bank, trained.geometry, info, head=trained.head)
            print(f"{ds.name}: head {trained.head.info} in {time.perf_counter() - t0:.1f} s", flush=True)
        if not (folder / "model" / "manifest.json").is_file():
            t0 = time.perf_counter()
            trained, info = train_model(read_micrograph(split.reference), split.exemplars_xy, split.diameter, train_cfg)
            save_model(folder / "model", trained.model, trained.bank, trained.geometry, info, head=trained.head)
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
                logits=smap.logits,
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
                    scores=z["scores"],
                    stride=int(z["stride"]),
                    offset=float(z["offset"]),
                    level=z["level"],
                    logits=bool(z["logits"]) if "logits" in z else False,
                )
                images[path.stem] = z["image"]
        trained = load_model(folder / "model")
        # a model trained before the blob term or its exemplar share: its profile as training makes it today
        if "exemplar_share" not in trained.manifest.get(blobs.BLOBS_KEY, {}):
            reference = read_micrograph(split.reference).data
            trained.manifest[blobs.BLOBS_KEY] = blobs.blob_profile(reference, split.exemplars_xy, split.diameter)
        out.append(Cached(ds.name, split, trained, maps, images, accuracy.distractors(ds)))
    return out


CutoffRule = Callable[[Cached, dict[str, Points], PickConfig], dict[str, float]]


def default_rule(c: Cached, cands: dict[str, Points], cfg: PickConfig) -> dict[str, float]:
    """The picker's own cutoff: the queries are one session in file-name order, its ``auto`` cutoff seeded by
    the reference's (as training measures it, here from the cached reference map)."""
    session = session_cutoff(cfg)
    if uses_head(c.trained, cfg):
        return {q.stem: _cutoff(cands[q.stem][1], cfg, probabilities=True)[0] for q in c.split.queries}
    if cfg.threshold == "auto":
        cut, rule = session_cutoff(cfg).cut(cands[c.split.reference.stem][1])
        if rule == "gmm":
            session.history.append(cut)  # the seed
    return {q.stem: _cutoff(cands[q.stem][1], cfg, session)[0] for q in c.split.queries}


# the blob term's DoG z of each micrograph, by (dataset, stem, polarity, map shape), and its local contrast, by
# (dataset, stem, "contrast", map shape): the same for every variant and exemplar draw evaluated in one run
_TERMS: dict[tuple[str, str, str, tuple[int, ...]], np.ndarray] = {}


def _cached_term(key: tuple[str, str, str, tuple[int, ...]], make: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
    if key not in _TERMS:
        _TERMS[key] = make(*args)
    return _TERMS[key]


def candidates(c: Cached, cfg: PickConfig) -> dict[str, Points]:
    """Every micrograph's candidates (reference included) under cfg."""
    geo, manifest = c.trained.geometry, c.trained.manifest
    out = {}
    for stem, m in c.maps.items():
        z = contrast = None
        if blobs.applies(m, manifest, cfg):
            image, shape = c.images[stem], m.scores.shape
            polarity = manifest[blobs.BLOBS_KEY]["polarity"]
            if cfg.blob_weight > 0:
                z = _cached_term((c.name, stem, polarity, shape), blobs.blob_z, m, geo, polarity, image)
            if cfg.contrast_weight > 0:
                contrast = _cached_term((c.name, stem, "contrast", shape), blobs.contrast_z, m, geo, image)
        out[stem] = find_candidates(
            blobs.with_blobs(m, geo, manifest, c.images[stem], cfg, z, contrast), geo, c.images[stem], cfg
        )
    return out


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
    extra = {} if c.distractors is None else accuracy.distractor_figures(picks, dict(truth), d, c.distractors)
    return {
        **extra,
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


DRAW_KEYS = (*KEYS, "precision_carbon", "precision_no_carbon", "junk_share")


def over_draws(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``table`` results of the same datasets under several exemplar draws (one cache each) -> one result whose
    figures are the means over the draws, with each figure's lowest draw under ``KEY_min`` and the number of
    draws under ``draws``. A figure a draw cannot give (no carbon on any query) is left out of its mean."""
    names = list(results[0]["rows"])
    if any(list(r["rows"]) != names for r in results):
        raise accuracy.BenchmarkError("the caches hold different datasets: prepare the same sets in each")
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        row: dict[str, Any] = {"draws": len(results)}
        for key in DRAW_KEYS:
            values = [r["rows"][name][key] for r in results if r["rows"][name].get(key) is not None]
            if key in KEYS or key in results[0]["rows"][name]:
                row[key] = float(np.mean(values)) if values else None
                row[f"{key}_min"] = float(np.min(values)) if values else None
        rows[name] = row
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in KEYS}
    mean.update({f"{k}_min": float(np.mean([r[f"{k}_min"] for r in rows.values()])) for k in KEYS})
    return {"rows": rows, "mean": mean, "draws": len(results)}


def _cell(r: dict[str, Any], key: str) -> str:
    low = r.get(f"{key}_min")
    return f"{r[key]:.3f}" if low is None or r.get("draws", 1) == 1 else f"{r[key]:.3f} ({low:.3f})"


def markdown(result: dict[str, Any], command: str) -> str:
    """The table of ``table`` (or of ``over_draws``: each cell the mean over the draws, its lowest draw in
    brackets) as Markdown, with the command that made it."""
    draws = result.get("draws", 1)
    lines = [
        f"Command: `{command}`",
        "",
        *([f"Means over {draws} exemplar draws; in brackets the lowest draw.", ""] if draws > 1 else []),
        "| dataset | candidate recall | AP | best global-cutoff F1 | F1 at the automatic cutoff | ratio | "
        "median count error |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(r, k) for k in KEYS) + " |")
    mean = {**result["mean"], "draws": draws}
    lines.append("| **mean** | " + " | ".join(_cell(mean, k) for k in KEYS) + " |")
    sims = {n: r for n, r in result["rows"].items() if "junk_share" in r}
    if sims:
        lines += [
            "",
            "| dataset | precision, micrographs with carbon | without carbon | difference | picks on junk |",
            "|---|---|---|---|---|",
        ]
        for name, r in sims.items():
            with_c, without = r["precision_carbon"], r["precision_no_carbon"]
            diff = "—" if with_c is None or without is None else f"{with_c - without:+.3f}"
            cells = ["—" if v is None else f"{v:.3f}" for v in (with_c, without)]
            share = "—" if r["junk_share"] is None else f"{r['junk_share']:.3f}"
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {diff} | {share} |")
    return "\n".join(lines) + "\n"


def grid(options: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every combination of ``--grid KEY=V1,V2,...`` options, each with its label (``KEY=V1 KEY2=W1``), in order:
    the first values of every grid first, so list the current defaults first (a tie goes to them). A value is
    JSON when it parses as JSON, else the plain string (as ``--pick-set``)."""
    axes: list[list[tuple[str, str, Any]]] = []
    keys: list[str] = []
    for option in options:
        key, sep, rest = option.partition("=")
        key = key.strip()
        raw = [v.strip() for v in rest.split(",") if v.strip()]
        if not sep or not key or not raw:
            raise accuracy.BenchmarkError(f"--grid expects KEY=VALUE,VALUE,..., got {option!r}")
        if key in keys or len(set(raw)) != len(raw):
            raise accuracy.BenchmarkError(f"--grid {key}: a key or a value given twice")
        keys.append(key)
        axes.append([(key, v, _pairs([f"{key}={v}"], "--grid")[key]) for v in raw])
    return [
        (" ".join(f"{k}={v}" for k, v, _ in combo), {k: value for k, _, value in combo})
        for combo in itertools.product(*axes)
    ]


def choose_figures(
    data_root: Path,
    caches: Sequence[Path],
    names: Sequence[str] | None,
    base: dict[str, Any],
    variants: Sequence[tuple[str, dict[str, Any]]],
) -> dict[str, dict[str, list[float]]]:
    """F1 at the automatic cutoff of every variant (``base`` updated with its values) on every dataset, one
    figure per cache (one cache per exemplar draw): variant label -> dataset -> [F1 of each cache]."""
    figures: dict[str, dict[str, list[float]]] = {label: {} for label, _ in variants}
    held: list[str] | None = None
    for cache in caches:
        cached = load(data_root, cache, names)
        found = [c.name for c in cached]
        if not found:
            raise accuracy.BenchmarkError(f"{cache}: no prepared dataset (run `study.py prepare --cache {cache}`)")
        if held is not None and found != held:
            raise accuracy.BenchmarkError(f"{cache} holds {found}, {caches[0]} holds {held}: prepare the same sets")
        held = found
        for label, values in variants:
            result = table(cached, PickConfig(**{**base, **values}), quiet=True)
            for name, row in result["rows"].items():
                figures[label].setdefault(name, []).append(float(row["f1"]))
            print(f"{cache}: {label}: mean F1 at the automatic cutoff {result['mean']['f1']:.3f}", flush=True)
        del cached
    return figures


def compare(
    data_root: Path,
    variants: Sequence[str],
    names: Sequence[str] | None,
    pick: dict[str, Any],
    command: str,
    args: argparse.Namespace,
) -> int:
    """Training variants, each prepared in caches of its own (one per exemplar draw), compared leaving one sample
    out: F1 at the automatic cutoff and AP over all candidates (issue 24 item 6: the encoder's part)."""
    if len(variants) < 2:
        raise accuracy.BenchmarkError("compare needs two --variant LABEL=CACHE,CACHE,... or more")
    figures: dict[str, dict[str, dict[str, list[float]]]] = {"f1": {}, "ap": {}}
    for spec in variants:
        label, sep, caches = spec.partition("=")
        if not sep or not caches:
            raise accuracy.BenchmarkError(f"--variant expects LABEL=CACHE,CACHE,..., got {spec!r}")
        for cache in caches.split(","):
            cached = load(data_root, Path(cache), names)
            if not cached:
                raise accuracy.BenchmarkError(f"{cache}: no prepared dataset")
            result = table(cached, PickConfig(**pick), quiet=True)
            for name, row in result["rows"].items():
                for key in ("f1", "ap"):
                    figures[key].setdefault(label, {}).setdefault(name, []).append(float(row[key]))
            print(f"{label} {cache}: mean F1 {result['mean']['f1']:.3f}, AP {result['mean']['ap']:.3f}", flush=True)
            del cached
    report = "".join(
        loso.markdown(loso.choose(figures[key]), title, key.upper() if key == "ap" else "F1") + "\n"
        for key, title in (("f1", "F1 at the automatic cutoff"), ("ap", "AP over all candidates"))
    )
    print(report, end="")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "figures": figures}, indent=1))
    if args.out:
        args.out.write_text(f"Command: `{command}`\n\n{report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except accuracy.BenchmarkError as error:
        print(f"study.py: {error}", file=sys.stderr)
        return 2


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("prepare", "evaluate", "choose", "compare"))
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument(
        "--cache",
        type=Path,
        action="append",
        default=None,
        help=f"default {DEFAULT_CACHE}; evaluate and choose: one per exemplar draw, repeat the option",
    )
    p.add_argument("--datasets", default=None, help="comma list (default: all)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pick-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="choose: PickConfig values to choose among (every combination; list the default first)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=CACHE,CACHE",
        help="compare: a training variant and its caches, one per exemplar draw in the same draw order (list the "
        "shipped one first)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the table as Markdown here")
    p.add_argument("--exemplars", type=int, default=None, help="prepare: exemplars per reference (default 15)")
    p.add_argument("--draw", type=int, default=None, help="prepare: exemplars drawn with default_rng(DRAW) (default 0)")
    p.add_argument(
        "--models-from",
        type=Path,
        default=None,
        help="prepare: take each dataset's encoder and bank from this cache (same draw) and train only the particle "
        "head (--train-set head_*) on them",
    )
    args = p.parse_args(argv)
    names = args.datasets.split(",") if args.datasets else None
    caches: list[Path] = args.cache or [DEFAULT_CACHE]
    if args.draw is not None and args.action != "prepare":
        p.error("--draw is for prepare (the cache keeps its draw)")
    if args.grid and args.action != "choose":
        p.error("--grid is for choose")
    command = " ".join([".venv/bin/python tests/benchmarks/study.py", *(argv or sys.argv[1:])])
    if args.action == "compare":
        return compare(args.data_root, args.variant, names, _pairs(args.pick_set, "--pick-set"), command, args)
    if args.action == "choose":
        if not args.grid:
            p.error("choose needs at least one --grid KEY=V1,V2,...")
        base = _pairs(args.pick_set, "--pick-set")
        variants = grid(args.grid)
        clash = sorted(set(base) & set(variants[0][1]))
        if clash:
            p.error(f"{', '.join(clash)}: in --grid and --pick-set")
        figures = choose_figures(args.data_root, caches, names, base, variants)
        try:
            choice = loso.choose(figures)
        except ValueError as error:
            raise accuracy.BenchmarkError(str(error)) from error
        report = loso.markdown(choice)
        print(report, end="")
        if args.json:
            doc = {
                "command": command,
                "caches": [str(c) for c in caches],
                "figures": figures,
                **dataclasses.asdict(choice),
                "loso_choice": choice.loso_choice,
                "decision": choice.decision(),
            }
            args.json.write_text(json.dumps(doc, indent=1))
        if args.out:
            args.out.write_text(f"Command: `{command}`\n\n{report}")
        return 0
    if len(caches) > 1 and args.action == "prepare":
        p.error("prepare takes one --cache")
    if args.action == "prepare":
        train_cfg = TrainConfig(**_pairs(args.train_set, "--train-set"))
        map_cfg = PickConfig(**_pairs(args.pick_set, "--pick-set"))
        prepare(args.data_root, caches[0], names, train_cfg, map_cfg, args.exemplars, args.draw, args.models_from)
        return 0
    results = []
    pick_cfg = PickConfig(**_pairs(args.pick_set, "--pick-set"))
    for cache in caches:  # one per exemplar draw
        cached = load(args.data_root, cache, names)
        if not cached:
            raise accuracy.BenchmarkError(f"{cache}: no prepared dataset (run `study.py prepare --cache {cache}`)")
        results.append(table(cached, pick_cfg, quiet=len(caches) > 1))
        del cached
    result = results[0] if len(results) == 1 else over_draws(results)
    if len(results) > 1:
        print(markdown(result, command), end="")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
