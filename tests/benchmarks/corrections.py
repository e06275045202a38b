"""A simulated operator corrects the picker (issue 26): F1 before and after, per sample, leaving one sample out.

On every development dataset of a ``study.py`` cache (one per exemplar draw), the first model picks the session
(the protocol's queries, automatic cutoff). The operator then looks at two micrographs (the first two queries by
name) and on each marks the highest-scoring wrong picks and the missed particles the model scores highest (the
score map at their centre): 40 clicks are 10 wrong and 10 missed on each, 10 clicks are 3 wrong and 2 missed on
each. The marks are applied as ``cryomae exemplars correct`` applies them (``apply_corrections``: the wrong picks become
negatives; the missed particles join the bank with ``--train-set corrections_missed=true``), every micrograph is
scored again and the session is cut as before. A second round marks two further queries on the re-picked
session and adds them.

The encoder is the cached one: training with corrections trains it as the first training did (same reference,
exemplars and seed) and adds the marks after, so only the bank, the negatives and the maps change.

F1 is reported over every query (the session an operator sees) and over the queries nobody clicked (held out).
``--grid negative_weight=...`` chooses the weight of the negatives leaving one sample out (``loso.py``).

    .venv/bin/python tests/benchmarks/corrections.py --cache .study/draw-0 --grid negative_weight=0.5,0,0.25,1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryomae.config import PickConfig, TrainConfig
from cryomae.evaluation.metrics import evaluate, match_picks
from cryomae.picking.marks import MicrographMarks, honour_marks, marks_by_micrograph
from cryomae.picking.picker import PickResult, ScoreMap, compute_score_map
from cryomae.training.corrections import CorrectionMarks, apply_corrections
from tests.benchmarks import loso, study
from tests.benchmarks.accuracy import DEFAULT_DATA_ROOT

CLICKS = {40: (10, 10), 10: (3, 2)}  # clicks -> (wrong, missed) marked on each of the two micrographs
ROUND_MICROGRAPHS = 2


def _found(picks: np.ndarray, scores: np.ndarray, truth: np.ndarray, d: float) -> np.ndarray:
    """Which true particles [M] the picks find: a true positive pick's nearest true particle (one-to-one by
    construction: the scoring matched them so)."""
    flags = match_picks(picks, scores, truth, d)
    found = np.zeros(len(truth), dtype=bool)
    if flags.any() and len(truth):
        tp = picks[flags]
        nearest = np.argmin(((tp[:, None, :] - truth[None, :, :]) ** 2).sum(-1), axis=1)
        found[nearest] = True
    return found


def _map_value(smap: ScoreMap, geo: Any, xy: np.ndarray) -> np.ndarray:
    """The score map at original-pixel centres xy [N, 2] (nearest cell)."""
    cells = (geo.to_model(xy) - smap.offset) / smap.stride
    r = np.clip(np.rint(cells[:, 1]).astype(int), 0, smap.scores.shape[0] - 1)
    c = np.clip(np.rint(cells[:, 0]).astype(int), 0, smap.scores.shape[1] - 1)
    return np.nan_to_num(smap.scores[r, c], nan=-np.inf)


def operator_marks(
    c: study.Cached, cfg: PickConfig, stems: Sequence[str], n_wrong: int, n_missed: int
) -> list[CorrectionMarks]:
    """What the simulated operator marks on the micrographs ``stems`` of the session as ``c`` picks it."""
    cands = study.candidates(c, cfg)
    cuts = study.default_rule(c, cands, cfg)
    d, geo = c.split.diameter, c.trained.geometry
    marks = []
    for stem in stems:
        xy, s = cands[stem]
        kept = s >= cuts[stem]
        picks, scores, truth = xy[kept], s[kept], c.split.truth[stem]
        flags = match_picks(picks, scores, truth, d)
        wrong = picks[~flags][:n_wrong]  # candidates come in descending score
        missed = truth[~_found(picks, scores, truth, d)]
        missed = missed[np.argsort(-_map_value(c.maps[stem], geo, missed), kind="stable")][:n_missed]
        marks.append(CorrectionMarks(image=c.images[stem], missed=missed, wrong=wrong, micrograph=stem))
    return marks


def corrected(
    c: study.Cached, marks: Sequence[CorrectionMarks], cfg: PickConfig, train: TrainConfig | None = None
) -> study.Cached:
    """``c`` with the marks applied to a copy of its model and every map scored again."""
    trained = copy.copy(c.trained)
    trained.bank = c.trained.bank.clone()
    trained.negatives = None if c.trained.negatives is None else c.trained.negatives.clone()
    apply_corrections(trained, marks, train or TrainConfig(), torch.device("cpu"))
    maps = {stem: compute_score_map(trained, c.images[stem], cfg) for stem in c.maps}
    return dataclasses.replace(c, trained=trained, maps=maps)


def f1(
    c: study.Cached, cfg: PickConfig, stems: Sequence[str], marks: Mapping[str, MicrographMarks] | None = None
) -> float:
    """F1 at the automatic cutoff over the queries ``stems`` (the session cut as the picker cuts it), with the
    operator's ``marks`` (by micrograph stem) holding on their micrographs as the picker holds them."""
    cands = study.candidates(c, cfg)
    cuts = study.default_rule(c, cands, cfg)
    picks = {}
    for k in stems:
        result = PickResult(cands[k][0], cands[k][1], cuts[k], n_windows=0, n_evaluated=0)
        result, _ = honour_marks(result, (marks or {}).get(k), c.split.diameter)
        picks[k] = (result.xy, result.scores)
    return evaluate(picks, {k: c.split.truth[k] for k in stems}, c.split.diameter).pooled.f1


def run_dataset(
    c: study.Cached, cfg: PickConfig, clicks: int, rounds: int, train: TrainConfig | None = None
) -> dict[str, float]:
    """F1 before and after each round, over every query and over the queries never clicked."""
    n_wrong, n_missed = CLICKS[clicks]
    queries = [q.stem for q in c.split.queries]
    clicked = queries[: ROUND_MICROGRAPHS * rounds]
    unclicked = queries[len(clicked) :]
    out: dict[str, float] = {}

    def measure(label: str, now: study.Cached, marks: Sequence[CorrectionMarks] = ()) -> None:
        row = study.score(now, cfg)
        out.update({label: row["f1"], f"{label}_ap": row["ap"], f"{label}_oracle": row["oracle"]})
        out[f"{label}_unclicked"] = f1(now, cfg, unclicked)
        if marks:  # the session the operator gets: the marks hold on the micrographs they were made on
            held = marks_by_micrograph(
                [m.micrograph for m in marks], [m.missed for m in marks], [m.wrong for m in marks]
            )
            out[f"{label}_held"] = f1(now, cfg, queries, held)

    measure("before", c)
    marks: list[CorrectionMarks] = []
    now = c
    for r in range(1, rounds + 1):
        stems = queries[ROUND_MICROGRAPHS * (r - 1) : ROUND_MICROGRAPHS * r]
        marks += operator_marks(now, cfg, stems, n_wrong, n_missed)
        now = corrected(c, marks, cfg, train)
        measure(f"round{r}", now, marks)
    return out


def _sample_means(rows: dict[str, list[float]]) -> dict[str, float]:
    """Dataset -> figures of each draw, to sample -> mean over its datasets and the draws."""
    samples: dict[str, list[float]] = {}
    for dataset, values in rows.items():
        samples.setdefault(loso.sample_of(dataset), []).extend(values)
    return {sample: float(np.mean(values)) for sample, values in samples.items()}


def report(documents: Sequence[dict[str, Any]], label: str = "default") -> str:
    """The Markdown table of one variant's runs (one document per exemplar draw, as ``--json`` writes them): F1
    at the automatic cutoff per sample before and after each round, mean over the draws, and the change."""
    merged: dict[str, dict[str, list[float]]] = {}
    for doc in documents:
        for key, variants in doc["figures"].items():
            for dataset, values in variants[label].items():
                merged.setdefault(key, {}).setdefault(dataset, []).extend(values)
    columns = [
        ("before", "40:before"),
        ("10 clicks", "10:round1"),
        ("10 + 10 clicks", "10:round2"),
        ("40 clicks", "40:round1"),
        ("40 + 40 clicks", "40:round2"),
        ("10 clicks, marks held", "10:round1_held"),
        ("40 clicks, marks held", "40:round1_held"),
        ("40 + 40 clicks, marks held", "40:round2_held"),
        ("unclicked queries, before", "40:before_unclicked"),
        ("after 40 + 40 clicks", "40:round2_unclicked"),
    ]
    columns = [(title, key) for title, key in columns if key in merged]
    table = {key: _sample_means(merged[key]) for _, key in columns}
    before = table["40:before"]
    lines = [
        "| sample | " + " | ".join(title for title, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]

    def cell(key: str, value: float, base: dict[str, float], sample: str) -> str:
        if key in ("40:before", "40:before_unclicked"):
            return f"{value:.3f}"
        return f"{value:.3f} ({value - base[sample]:+.3f})"

    for sample in sorted(before):
        cells = []
        for _, key in columns:
            base = table["40:before_unclicked"] if key.endswith("unclicked") else before
            cells.append(cell(key, table[key][sample], base, sample))
        lines.append(f"| {sample} | " + " | ".join(cells) + " |")
    means = []
    for _, key in columns:
        base = table["40:before_unclicked"] if key.endswith("unclicked") else before
        value, ref = float(np.mean(list(table[key].values()))), float(np.mean(list(base.values())))
        means.append(
            f"**{value:.3f}**" if value == ref or key.endswith("before") else f"**{value:.3f} ({value - ref:+.3f})**"
        )
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--cache", type=Path, action="append", default=[], help="one per exemplar draw")
    p.add_argument("--report", type=Path, nargs="+", default=None, help="only write the table of these --json files")
    p.add_argument("--out", type=Path, default=None, help="with --report: write the Markdown table here")
    p.add_argument("--label", default="default", help="with --report: the variant (a --grid label) to show")
    p.add_argument("--datasets", default=None, help="comma list (default: all)")
    p.add_argument("--clicks", type=int, choices=sorted(CLICKS), action="append", default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="PickConfig values to choose among")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig of the marks")
    args = p.parse_args(argv)
    if args.report:
        text = report([json.loads(path.read_text()) for path in args.report], args.label)
        print(text, end="")
        if args.out:
            args.out.write_text(text)
        return 0
    if not args.cache:
        p.error("give --cache (one per exemplar draw) or --report")
    train = TrainConfig(**study._pairs(args.train_set, "--train-set"))
    names = args.datasets.split(",") if args.datasets else None
    variants = study.grid(args.grid) if args.grid else [("default", {})]
    clicks_list = args.clicks or [40, 10]
    results: dict[str, Any] = {"command": " ".join(["tests/benchmarks/corrections.py", *(argv or sys.argv[1:])])}
    figures: dict[str, dict[str, dict[str, list[float]]]] = {}
    for cache in args.cache:
        cached = study.load(args.data_root, cache, names)
        for label, values in variants:
            cfg = PickConfig(**values)
            for clicks in clicks_list:
                for c in cached:
                    row = run_dataset(c, cfg, clicks, args.rounds, train)
                    for key, value in row.items():
                        figures.setdefault(f"{clicks}:{key}", {}).setdefault(label, {}).setdefault(c.name, [])
                        figures[f"{clicks}:{key}"][label][c.name].append(value)
                    shown = " ".join(f"{k} {v:.3f}" for k, v in row.items())
                    print(f"{cache.name} {label} {clicks} clicks {c.name}: {shown}", flush=True)
        del cached
    results["figures"] = figures
    for key in sorted(figures):
        if key.endswith((f"round{args.rounds}", "round1")):
            choice = loso.choose(figures[key])
            print(f"\n### {key}\n")
            print(loso.markdown(choice, f"F1 at the automatic cutoff ({key})"), end="")
            results.setdefault("choices", {})[key] = {**dataclasses.asdict(choice), "loso_choice": choice.loso_choice}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
