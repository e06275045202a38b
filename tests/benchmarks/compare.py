"""Side-by-side benchmark: cryomae (each preset), Topaz (pretrained and trained on the 15 exemplars) and a
difference-of-Gaussians picker, on every development dataset, with one scoring rule, in one run.

The protocol is the data README's few-shot protocol (``accuracy.py`` implements it): micrographs sorted by
name, the first is the reference, 15 exemplars drawn with ``default_rng(0)`` from its ground truth, every other
micrograph a query. Every picker is scored the same way (the paper's rule: diameter-sized boxes, IoU >= 0.5,
one-to-one, pooled over the queries): F1 at the picker's own threshold, AP over its whole ranking, and the
seconds per micrograph of reading plus picking on this machine.

- cryomae: trained on the reference with the 15 exemplars (default configuration), automatic per-micrograph
  cutoff. A picker spec is ``PRESET[@LAYER][:KEY=VALUE,...]`` with PickConfig overrides, e.g.
  ``fast:stride_fraction=0.25``; specs sharing a preset and layer share one training. The first spec is also
  trained and picked with the exemplars of draws 1-4 (``default_rng(1..4)``, ``--draws``) and reported as its
  mean and lowest F1 over the five draws: which particles were clicked changes the result.
- Topaz 0.3.20 in its own virtual environment under the cache folder (installed on first use; nothing of Topaz
  enters the project's dependencies): the general pretrained ``resnet16_u64`` model, and a model trained with
  Topaz's PU learning on the same 15 exemplars (see ``topaz_runner.py``).
- DoG: polarity and threshold calibrated on the 15 exemplars (``accuracy.run_dog``).

Writes docs/benchmarks.md (tables, the speed tables of ``speed.py`` when docs/benchmarks-speed.json exists, and
the plot), docs/benchmarks.json and docs/benchmarks-f1-time.png.

    .venv/bin/python tests/benchmarks/compare.py
    .venv/bin/python tests/benchmarks/compare.py --datasets sim/apoferritin --pickers fast,dog --max-queries 3

This file is not collected by pytest (it is not named ``test_*.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tests.benchmarks.gpu_report as gpu_report
import tests.benchmarks.loso as loso
import tests.benchmarks.topaz_runner as topaz_runner
from cryomae.config import PickConfig, TrainConfig
from cryomae.device import resolve_device
from cryomae.errors import CryomaeError
from cryomae.evaluation.metrics import evaluate
from cryomae.io.atomic import atomic_output
from cryomae.logging import configure_logging
from cryomae.model.layout import sha256_file
from cryomae.model.presets import get_preset
from tests.benchmarks.accuracy import (
    DEFAULT_DATA_ROOT,
    PROJECT_ROOT,
    BenchmarkError,
    Points,
    Row,
    Split,
    command_line,
    discover_datasets,
    few_shot_split,
    git_commit,
    machine,
    oracle_f1,
    result_line,
    run_cryomae,
    run_dog,
    say,
    train_on_split,
)

DOCS = PROJECT_ROOT / "docs"
TOPAZ_PRETRAINED, TOPAZ_TRAINED, DOG_SPEC = "topaz", "topaz-trained", "dog"
TOPAZ_LABELS = {TOPAZ_PRETRAINED: "Topaz resnet16_u64 (pretrained)", TOPAZ_TRAINED: "Topaz trained on the 15 exemplars"}
# ``small`` (add it with --pickers) takes 15-20 s per micrograph and 3 minutes of training per dataset on a 2-core
# CPU for the same F1 as ``fast`` (docs/performance.md); on a GPU add ``small,base,paper``.
DEFAULT_PICKERS = (
    "fast,fast:stride_fraction=0.25,fast:shared_tokens=false,search=coarse_to_fine,"
    f"{TOPAZ_PRETRAINED},{TOPAZ_TRAINED},{DOG_SPEC}"
)


def parse_spec(spec: str) -> tuple[str, int | None, dict[str, Any]]:
    """``PRESET[@LAYER][:KEY=VALUE,...]`` -> (preset, feature layer or None, PickConfig overrides)."""
    head, _, tail = spec.partition(":")
    name, _, layer = head.partition("@")
    try:
        get_preset(name)
    except KeyError as exc:
        raise BenchmarkError(f"picker {spec!r}: {exc.args[0]}") from None
    overrides: dict[str, Any] = {}
    for pair in filter(None, tail.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise BenchmarkError(f"picker {spec!r}: expected KEY=VALUE after ':', got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    try:
        return name, int(layer) if layer else None, overrides
    except ValueError:
        raise BenchmarkError(f"picker {spec!r}: the feature layer after '@' must be an integer") from None


def topaz_row(split: Split, result: topaz_runner.TopazResult, label: str) -> Row:
    """Score Topaz's picks like every other picker's: at its own threshold, AP over its whole ranking."""
    empty = (np.zeros((0, 2)), np.zeros(0))
    ranked: dict[str, Points] = {q.stem: result.picks.get(q.stem, empty) for q in split.queries}
    kept = {s: (xy[sc >= result.threshold], sc[sc >= result.threshold]) for s, (xy, sc) in ranked.items()}
    at = evaluate(dict(kept), split.truth, split.diameter)
    every = evaluate(dict(ranked), split.truth, split.diameter)
    return Row.scored(
        label,
        at.pooled,
        every.average_precision,
        len(split.queries),
        result.seconds_per_micrograph,
        train_s=result.train_seconds,
        oracle=oracle_f1(ranked, split.truth, split.diameter),
        details={
            "threshold": result.threshold,
            "downsample": result.downsample,
            "radius": result.radius,
            **result.details,
        },
    )


def topaz_cache_key(spec: str, split: Split) -> str:
    """What a Topaz result depends on: the runner (its whole source: code and settings), the inputs (file
    contents, diameter, exemplars) and the machine (the seconds per micrograph are this machine's)."""
    inputs: list[Any] = [sha256_file(q) for q in split.queries]
    if spec == TOPAZ_TRAINED:
        inputs += [sha256_file(split.reference), np.round(split.exemplars_xy, 3).tolist()]
    cpu = machine()
    key = {
        "spec": spec,
        "runner": hashlib.sha256(inspect.getsource(topaz_runner).encode()).hexdigest(),
        "diameter": round(split.diameter, 4),
        "inputs": inputs,
        "machine": [cpu["cpu_model"], cpu["cpu_count"]],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def run_topaz(spec: str, split: Split, workdir: Path, reuse: bool) -> topaz_runner.TopazResult:
    """Run Topaz (pretrained or trained on the exemplars), or reuse the result of an identical earlier run.

    Results are kept under ``<cache>/results/<key>.json`` (see :func:`topaz_cache_key`): Topaz takes 10-40 s per
    micrograph on a 2-core CPU and minutes to train. The pretrained result cannot change while the key stays the
    same; the trained one is one draw (``topaz train`` takes no seed), kept as measured rather than drawn again
    on every run. A reused result says so in its details (``reused_from``: when it was measured).
    """
    path = topaz_runner.cache_dir() / "results" / f"{topaz_cache_key(spec, split)}.json"
    if reuse and path.is_file():
        try:
            record = json.loads(path.read_text())
            result = topaz_runner.result_from_json(record["result"])
            result.details["reused_from"] = record["measured"]
            say(f"{spec}: reusing the result measured {record['measured']} ({path})")
            return result
        except (OSError, ValueError, KeyError, TypeError) as exc:
            say(f"{spec}: ignoring the unreadable cached result {path}: {exc}")
    exe = topaz_runner.ensure_topaz(log=say)
    work = Path(tempfile.mkdtemp(prefix=f"{spec}-", dir=workdir))
    if spec == TOPAZ_PRETRAINED:
        result = topaz_runner.topaz_pretrained(split.queries, split.diameter, work, topaz=exe, log=say)
    else:
        result = topaz_runner.topaz_trained(
            split.reference, split.exemplars_xy, split.queries, split.diameter, work, topaz=exe, log=say
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    measured = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    record = {"measured": measured, "result": topaz_runner.result_to_json(result)}
    with atomic_output(path) as tmp:  # a unique temporary name: two runs at once cannot mix their writes
        tmp.write_text(json.dumps(record))
    return result


def run_dataset(
    name: str,
    split: Split,
    pickers: list[str],
    device: str,
    workdir: Path,
    reuse_topaz: bool = True,
    draw_splits: Sequence[tuple[int, Split]] = (),
) -> list[Row]:
    """Every picker on one dataset; the first cryomae spec also on each of ``draw_splits`` (the same split with
    the exemplars of another draw: rows marked ``details["draw"]``, reported as the mean over the draws)."""
    rows: list[Row] = []
    trained: dict[tuple[str, int | None], Any] = {}
    for spec in pickers:
        if spec in (TOPAZ_PRETRAINED, TOPAZ_TRAINED):
            row = topaz_row(split, run_topaz(spec, split, workdir, reuse_topaz), TOPAZ_LABELS[spec])
        elif spec == DOG_SPEC:
            row = run_dog(split, name)
        else:
            preset, layer, overrides = parse_spec(spec)
            train_cfg = TrainConfig(preset=preset, feature_layer=layer, device=device)
            pick_cfg = PickConfig(**{"device": device, **overrides})
            key = (preset, layer)
            if key not in trained:
                trained.clear()  # one model in memory at a time
                trained[key] = train_on_split(split, train_cfg, name)
            row = run_cryomae(split, preset, train_cfg, pick_cfg, name, trained_model=trained[key])
            row.picker = f"cryomae {spec}"
            if draw_splits and not any(DRAW in r.details for r in rows):
                rows += draw_rows(name, spec, preset, draw_splits, train_cfg, pick_cfg)
        rows.append(row)
        say(result_line(name, row))
    return rows


DRAW = "draw"  # a Row's details key: the exemplar draw of an extra cryomae row (``--draws``)


def draw_rows(
    name: str,
    spec: str,
    preset: str,
    draw_splits: Sequence[tuple[int, Split]],
    train_cfg: TrainConfig,
    pick_cfg: PickConfig,
) -> list[Row]:
    """``spec`` trained and picking with the exemplars of each other draw (each model freed after its draw)."""
    rows = []
    for draw, split in draw_splits:
        row = run_cryomae(split, preset, train_cfg, pick_cfg, f"{name} draw {draw}")
        row.picker = f"cryomae {spec}"
        row.details[DRAW] = draw
        say(result_line(f"{name} (draw {draw})", row))
        rows.append(row)
    return rows


def over_draws(rows: Sequence[Row]) -> list[Row] | None:
    """Every draw's row of the spec that ran over several draws, the protocol's first, or None where no spec did."""
    extra = [r for r in rows if DRAW in r.details]
    if not extra:
        return None
    return [next(r for r in rows if r.picker == extra[0].picker and DRAW not in r.details), *extra]


# ------------------------------------------------------------------------------------------------- reports


def plot(results: dict[str, list[Row]], out: Path) -> None:
    """F1 at each picker's own threshold against seconds per micrograph, one panel per dataset."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.0), squeeze=False)
    pickers = sorted({r.picker for rows in results.values() for r in rows})
    markers = dict(zip(pickers, "osD^v<>ph*X", strict=False))
    for ax, name in zip(axes[0], names, strict=True):
        for r in (r for r in results[name] if DRAW not in r.details):
            ax.scatter(r.pick_s_per_micrograph, r.f1, marker=markers.get(r.picker, "o"), s=50, label=r.picker)
        ax.set_xscale("log")
        ax.set_xlabel("seconds per micrograph (log)")
        ax.set_title(name, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("F1 at the picker's own threshold")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draws_line(drawn: Sequence[Row]) -> str:
    """One sentence: a cryomae spec's F1 and AP over the exemplar draws (``over_draws``: the protocol's first)."""
    f1 = [r.f1 for r in drawn]
    aps = [r.ap for r in drawn if r.ap is not None]
    low = min(drawn, key=lambda r: r.f1)
    ap = f"; AP mean {np.mean(aps):.3f}, lowest {min(aps):.3f}" if aps else ""
    return (
        f"{drawn[0].picker} over {len(drawn)} exemplar draws (`default_rng(0..{len(drawn) - 1})`, each trained and "
        f"picked on its own): F1 mean **{np.mean(f1):.3f}**, lowest {low.f1:.3f} (draw {low.details.get(DRAW, 0)})"
        f"{ap}; per draw " + ", ".join(f"{r.f1:.3f}" for r in drawn) + "."
    )


def sample_bars(results: dict[str, list[Row]]) -> list[str]:
    """Issue 24's bars per sample (``loso.sample_of``: EMPIAR-10017 bin4 and full are one), from one run: the
    cryomae spec that ran over the draws, on the protocol's draw and as the mean (lowest) of the draws, against
    the best peer's F1 at its own cutoff and 0.92 x cryomae's best global cutoff (mean over the draws)."""
    by_sample: dict[str, list[str]] = {}
    for name in results:
        by_sample.setdefault(loso.sample_of(name), []).append(name)
    drawn = {name: over_draws(rows) for name, rows in results.items()}
    if not any(drawn.values()):
        return []
    lines = [
        "### Per sample: cryomae against the best peer and its own best cutoff",
        "",
        "A sample's figure is the mean of its datasets' (EMPIAR-10017 bin4 and full are one sample). Issue 24's "
        "bars: cryomae's F1 at its automatic cutoff at least the best peer's at its own cutoff, and at least "
        "0.92 x its own best global cutoff's (both over the exemplar draws).",
        "",
        "| sample | cryomae, protocol's draw | cryomae, mean (lowest) of the draws | best peer, own cutoff | "
        "0.92 x cryomae's best global cutoff | bars |",
        "|---|---|---|---|---|---|",
    ]
    means: dict[str, list[float]] = {}
    for sample, names in by_sample.items():
        sets = [d for d in (drawn[n] for n in names) if d is not None]
        if len(sets) != len(names):
            continue
        first = float(np.mean([rows[0].f1 for rows in sets]))
        per_draw = np.mean([[r.f1 for r in rows] for rows in sets], axis=0)  # [draws]
        oracle = float(np.mean([[(r.oracle or {}).get("f1", np.nan) for r in rows] for rows in sets]))
        peers: dict[str, list[float]] = {}
        for n in names:
            for r in results[n]:
                if not r.picker.startswith("cryomae"):
                    peers.setdefault(r.picker, []).append(r.f1)
        peer_f1 = {k: float(np.mean(v)) for k, v in peers.items()}
        best = max(peer_f1, key=lambda k: peer_f1[k]) if peer_f1 else None
        mean_f1 = float(per_draw.mean())
        misses = []
        if best is not None and first < peer_f1[best]:
            misses.append("below the peer on the protocol's draw")
        if best is not None and mean_f1 < peer_f1[best]:
            misses.append("below the peer over the draws")
        if mean_f1 < 0.92 * oracle:
            misses.append("below 0.92 x best cutoff")
        means.setdefault("protocol", []).append(first)
        means.setdefault("draws", []).append(mean_f1)
        for k, v in peer_f1.items():
            means.setdefault(k, []).append(v)
        lines.append(
            f"| {sample} | {first:.3f} | {mean_f1:.3f} ({per_draw.min():.3f}) | "
            + (f"{peer_f1[best]:.3f} {best}" if best else "—")
            + f" | {0.92 * oracle:.3f} | {'; '.join(misses) or 'met'} |"
        )
    if not means:
        return []
    peer_means = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in means.items() if k not in ("protocol", "draws"))
    lines += [
        f"| **mean of {len(means.get('draws', []))} samples** | **{np.mean(means['protocol']):.3f}** | "
        f"**{np.mean(means['draws']):.3f}** | {peer_means} | | |",
        "",
    ]
    return lines


def count_error(row: Row) -> float | None:
    """Median over the queries of |picks - truth| / truth per micrograph (None where the row has no counts)."""
    pairs = [(m.get("n_picks"), m.get("n_truth")) for m in row.per_micrograph]
    errors = [abs(p - t) / max(t, 1) for p, t in pairs if p is not None and t is not None]
    return float(np.median(errors)) if errors else None


def _f(v: float | None, d: int = 3) -> str:
    return "—" if v is None else f"{v:.{d}f}"


def markdown(meta: dict[str, Any], results: dict[str, list[Row]], splits: dict[str, Split], png: Path | None) -> str:
    m = meta["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Measured figures only; each section names the machine and the command that produced it. "
        "Reproduce everything with `bash scripts/benchmarks.sh` (see tests/benchmarks/README.md).",
        "",
        "## Accuracy and speed side by side",
        "",
        f"Machine: {meta['device']} — {m['cpu_model'] or m['processor']}, {m['cpu_count']} CPU cores, torch "
        f"{m['torch']}, GPU: {m['cuda_device'] or 'none'}. Commit {meta['commit']}, {meta['date']}, "
        f"{meta['total_s'] / 60:.0f} min in all.",
        "",
        f"Command: `{meta['command']}`",
        "",
        *(_amended_line(a) for a in meta.get("amended", [])),
        "Protocol: the data README's few-shot protocol (first micrograph by name = reference, its 15 exemplars "
        "drawn with `default_rng(0)`, every other micrograph a query). Scoring, the same for every picker: boxes "
        "of the particle diameter, a pick is true at IoU >= 0.5 with an unmatched ground-truth box, pooled over "
        "the queries. **F1** at the picker's own threshold (cryomae: its automatic per-micrograph cutoff; Topaz: "
        "score 0, i.e. p = 0.5; DoG: the threshold calibrated on the exemplars), **AP** over the picker's whole "
        "ranking, **oracle F1**: the best F1 over one global threshold chosen with the ground truth (an upper "
        "bound, not a result). **candidate recall** (cryomae): the share of true particles some candidate "
        "matches before any cutoff; **count error**: the median over the queries of |picks - truth| / truth. "
        "**s / micrograph**: reading plus picking (Topaz: its preprocessing plus "
        "extraction), mean over the queries, on this machine; **train s**: training from the 15 exemplars.",
        "",
    ]
    summary: dict[str, dict[str, Row]] = {}
    draw_summary: dict[str, list[Row]] = {}
    for name, rows in results.items():
        s = splits[name]
        lines += [
            f"### {name}",
            "",
            f"Particle diameter {s.diameter:g} px; reference {s.reference.name}; {len(s.queries)} queries, "
            f"{s.n_truth:,} ground-truth particles.",
            "",
            "| picker | F1 | precision | recall | AP | oracle F1 | candidate recall | count error | s / micrograph "
            "| train s | picks |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        reused = sorted({str(r.details["reused_from"]) for r in rows if r.details.get("reused_from")})
        for r in (r for r in rows if DRAW not in r.details):
            oracle = r.oracle["f1"] if r.oracle else None
            mark = " †" if r.details.get("reused_from") else ""
            lines.append(
                f"| {r.picker}{mark} | **{r.f1:.3f}** | {r.precision:.3f} | {r.recall:.3f} | {_f(r.ap)} | "
                f"{_f(oracle)} | {_f(r.details.get('candidate_recall'))} | {_f(count_error(r), 2)} | "
                f"{r.pick_s_per_micrograph:.2f} | {_f(r.train_s, 1)} | {r.n_picks:,} |"
            )
            summary.setdefault(r.picker, {})[name] = r
        lines.append("")
        drawn = over_draws(rows)
        if drawn:
            lines += [draws_line(drawn), ""]
            draw_summary[name] = drawn
        if reused:
            lines += [
                f"† the result of an identical earlier run on this machine, measured {', '.join(reused)} (same "
                "Topaz, runner code and settings, input files and machine; `--rerun-topaz` runs it again).",
                "",
            ]
    names = list(results)
    lines += sample_bars(results)
    lines += [
        "### Summary: F1 / seconds per micrograph",
        "",
        "| picker | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for picker, by in summary.items():
        cells = [f"{by[n].f1:.3f} / {by[n].pick_s_per_micrograph:.2f} s" if n in by else "—" for n in names]
        lines.append(f"| {picker} | " + " | ".join(cells) + " |")
    if draw_summary:
        first = next(iter(draw_summary.values()))
        cells = [
            f"{np.mean([r.f1 for r in draw_summary[n]]):.3f} ({min(r.f1 for r in draw_summary[n]):.3f})"
            if n in draw_summary
            else "—"
            for n in names
        ]
        lines.append(f"| {first[0].picker}, mean (lowest) of {len(first)} exemplar draws | " + " | ".join(cells) + " |")
    lines.append("")
    if png is not None:
        lines += [f"![F1 against seconds per micrograph]({png.name})", ""]
    speed_json = DOCS / "benchmarks-speed.json"
    if speed_json.is_file():
        from tests.benchmarks.speed import markdown as speed_markdown

        lines += ["## Speed per preset", "", speed_markdown(json.loads(speed_json.read_text())), ""]
    return "\n".join(lines)


def _amended_line(a: dict[str, Any]) -> str:
    """The report's line for one amendment (``--amend-with``)."""
    when = f"at commit {a['commit']}, {a['date']} ({a['total_s'] / 60:.0f} min; `{a['command']}`)"
    if "pickers" not in a:  # an amendment of whole datasets, every picker re-run
        return (
            f"Amended: {', '.join(a['datasets'])} re-run {when}; their rows below are that run's (but for those a "
            "later amendment replaced), Topaz's reused from the first where marked †.\n"
        )
    return (
        f"Amended: the rows of {', '.join(a['pickers'])} on {', '.join(a['datasets'])} re-run {when}; the other "
        "pickers' rows are the first run's.\n"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--datasets", default=None, help="comma-separated dataset names (default: all)")
    p.add_argument(
        "--pickers", default=DEFAULT_PICKERS, help=f"comma-separated picker specs (default: {DEFAULT_PICKERS})"
    )
    p.add_argument("--max-queries", type=int, default=None, help="score only the first N queries of each dataset")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=DOCS / "benchmarks.md")
    p.add_argument(
        "--rerun-topaz",
        action="store_true",
        help="run Topaz even when an identical earlier run's result is cached (same code, settings, inputs, machine)",
    )
    p.add_argument(
        "--draws",
        type=int,
        default=5,
        help="also train and pick the first cryomae spec with the exemplars of draws 1..N-1 (default_rng(k)); "
        "reported as its mean and lowest F1 over the N draws (1: the protocol's draw only)",
    )
    p.add_argument("--verbose", action="store_true")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="write the report and plot again from a saved run's JSON (nothing is run; e.g. after a report change)",
    )
    p.add_argument(
        "--amend-with",
        type=Path,
        action="append",
        default=[],
        help="with --from-json: a later run's JSON whose datasets replace the saved run's (e.g. after a change that "
        "moves only some datasets; the report names the later run's commit, date and command)",
    )
    return p


def _split_pickers(text: str) -> list[str]:
    """Comma-separated specs; commas inside a spec's ``:KEY=VALUE,...`` part stay with it."""
    out: list[str] = []
    for part in text.split(","):
        if out and "=" in part and ":" not in part and ":" in out[-1]:
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out


def run(args: argparse.Namespace) -> int:
    pickers = _split_pickers(args.pickers)
    for spec in pickers:
        if spec not in (TOPAZ_PRETRAINED, TOPAZ_TRAINED, DOG_SPEC):
            _, _, overrides = parse_spec(spec)
            PickConfig(**overrides)  # fail now on a bad option, not after an hour
    available = {d.name: d for d in discover_datasets(args.data_root.resolve())}
    names = args.datasets.split(",") if args.datasets else sorted(available)
    missing = [n for n in names if n not in available]
    if missing or not names:
        raise BenchmarkError(f"unknown dataset(s) {missing or names}; found: {', '.join(sorted(available))}")
    device = resolve_device(args.device)
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "pickers": pickers,
        "max_queries": args.max_queries,
        "draws": args.draws,
        "topaz_version": topaz_runner.TOPAZ_VERSION,
    }
    results: dict[str, list[Row]] = {}
    splits: dict[str, Split] = {}
    t0 = time.perf_counter()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name(out.stem + "-f1-time.png")
    previous = out.read_text() if out.is_file() else ""  # its GPU section (gpu_report.py) is kept
    with tempfile.TemporaryDirectory(prefix="cryomae-compare-") as tmp:
        for name in names:
            split = few_shot_split(available[name], args.max_queries)
            say(f"== {name}: diameter {split.diameter:g} px, {len(split.queries)} queries, {split.n_truth} truth")
            splits[name] = split
            draw_splits = [(k, few_shot_split(available[name], args.max_queries, draw=k)) for k in range(1, args.draws)]
            results[name] = run_dataset(name, split, pickers, args.device, Path(tmp), not args.rerun_topaz, draw_splits)
            meta["total_s"] = time.perf_counter() - t0
            plot(results, png)
            out.write_text(gpu_report.keep_section(markdown(meta, results, splits, png), previous))
            out.with_suffix(".json").write_text(
                json.dumps(
                    {"meta": meta, "results": {n: [asdict(r) for r in rows] for n, rows in results.items()}},
                    indent=1,
                    default=str,
                )
            )
    say(f"report written to {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _row_key(row: dict[str, Any]) -> tuple[str, Any]:
    """A row's place in a run: its picker and, for cryomae's other exemplar draws, the draw."""
    return row["picker"], (row.get("details") or {}).get(DRAW)


def amended_rows(saved: list[dict[str, Any]], later: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dataset's rows of a saved run with a later run's: a later row replaces the saved row of the same picker
    and draw in its place, the saved rows of pickers the later run did not run stay, new ones come last."""
    fresh = {_row_key(r): r for r in later}
    out = [fresh.pop(_row_key(r), r) for r in saved]
    return out + list(fresh.values())


def report_again(args: argparse.Namespace) -> int:
    """The report and plot of a saved run (``--from-json``), with today's report code."""
    saved = json.loads(args.from_json.read_text())
    for later_path in args.amend_with:
        later = json.loads(later_path.read_text())
        for name, rows in later["results"].items():
            saved["results"][name] = amended_rows(saved["results"].get(name, []), rows)
        amended = {k: later["meta"].get(k) for k in ("commit", "date", "command", "total_s")}
        pickers = sorted({r["picker"] for rows in later["results"].values() for r in rows})
        saved["meta"].setdefault("amended", []).append(
            {**amended, "datasets": sorted(later["results"]), "pickers": pickers}
        )
    available = {d.name: d for d in discover_datasets(args.data_root.resolve())}
    results = {name: [Row(**r) for r in rows] for name, rows in saved["results"].items()}
    splits = {name: few_shot_split(available[name], saved["meta"].get("max_queries")) for name in results}
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name(out.stem + "-f1-time.png")
    plot(results, png)
    previous = out.read_text() if out.is_file() else ""
    out.write_text(gpu_report.keep_section(markdown(saved["meta"], results, splits, png), previous))
    if args.amend_with or args.from_json.resolve() != out.with_suffix(".json").resolve():
        out.with_suffix(".json").write_text(json.dumps(saved, indent=1, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.amend_with and not args.from_json:
        parser.error("--amend-with amends a saved run: give it with --from-json")
    configure_logging("INFO" if args.verbose else "WARNING")
    try:
        return report_again(args) if args.from_json else run(args)
    except (BenchmarkError, CryomaeError, pydantic.ValidationError, topaz_runner.TopazError) as exc:
        print(f"compare.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
