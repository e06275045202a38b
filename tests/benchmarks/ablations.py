"""The CryoMAE paper's ablations (its Tables 3-7) on our development sets, with the paper's averages beside ours.

Each variant is one ``study.py`` cache (trained once, score maps kept) evaluated with the default picking
rules; variants that only change the score map reuse the default model. Writes docs/ablations.md and .json.

    .venv/bin/python tests/benchmarks/ablations.py            # about 35 minutes on 2 CPU cores
    .venv/bin/python tests/benchmarks/ablations.py --missing  # only the rows docs/ablations.json lacks

The 7 distinct development sets are used (empiar10017/full is bin4 at 4x the size, with the same figures).
This file is not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryomae.config import PickConfig, TrainConfig
from tests.benchmarks.accuracy import DEFAULT_DATA_ROOT, PROJECT_ROOT, discover_datasets
from tests.benchmarks.study import DEFAULT_CACHE, _folder, load, prepare, table

DATASETS = [
    "empiar10017/bin4",
    "sim/apoferritin",
    "sim/gltph_micelle",
    "sim/mtor",
    "sim/ruvab",
    "sim/spliceosome",
    "sim/tric",
]


@dataclass
class Variant:
    table: str  # the paper's table
    name: str
    paper_f1: float | None  # the paper's average F1 over its five EMPIAR sets
    train: dict[str, Any] = field(default_factory=dict)
    score_map: dict[str, Any] = field(default_factory=dict)  # PickConfig options that shape the score map
    exemplars: int | None = None


VARIANTS = [  # most telling first: the file is written after every variant
    Variant("3", "with the adjusted (PU) SCS loss: our default", 0.591),
    Variant("3", "without the SCS loss (pre-training only)", 0.240, train={"epochs": 0}),
    Variant("4", "untrained encoder (neither stage)", None, train={"pretrain_epochs": 0, "epochs": 0}),
    Variant("3", "with the unadjusted SCS loss", 0.581, train={"pi_hat": None}),
    Variant("4", "without pre-training", 0.432, train={"pretrain_epochs": 0}),
    Variant("5", "max over the bank (mean is our default)", 0.591, score_map={"score": "max"}),
    Variant("7", "stride window/4", 0.490, score_map={"stride_fraction": 0.25}),
    Variant("7", "stride window/16", 0.589, score_map={"stride_fraction": 0.0625}),
    Variant("6", "5 exemplars", 0.373, exemplars=5),
    Variant("6", "25 exemplars", 0.594, exemplars=25),
    # which encoder layer gives the feature (the product's transformer at picking time; issue 13 item 4). Deeper
    # layers embed every window separately (no shared-token shortcut): at stride window/4 to fit a CPU's time,
    # so compare them with the "stride window/4" row
    *(
        Variant("layers", f"{label} (stride window/4)", None, train=train, score_map={"stride_fraction": 0.25})
        for label, train in (
            ("feature after transformer block 1", {"feature_layer": 1}),
            ("feature after the last block, normed", {"feature_layer": -1}),
            ("feature after block 2", {"feature_layer": 2}),
        )
    ),
    Variant("6", "1 exemplar", 0.207, exemplars=1),
]
PAPER_DEFAULT_F1 = 0.591  # adjusted SCS, pre-trained, max, 15 exemplars, stride 28 (window/8)


def run_variant(v: Variant, root: Path, data_root: Path, default: Path) -> dict[str, Any]:
    cache = default if not (v.train or v.score_map or v.exemplars) else root / f"ablation-{slug(v.name)}"
    if v.score_map and not v.train and v.exemplars is None:
        for ds in discover_datasets(data_root):  # the same trained model: copy it, rescore only
            if ds.name in DATASETS and not (_folder(cache, ds.name) / "model").exists():
                (_folder(cache, ds.name)).mkdir(parents=True, exist_ok=True)
                shutil.copytree(_folder(default, ds.name) / "model", _folder(cache, ds.name) / "model")
    t0 = time.perf_counter()
    prepare(data_root, cache, DATASETS, TrainConfig(**v.train), PickConfig(**v.score_map), v.exemplars)
    result = table(load(data_root, cache, DATASETS), PickConfig(**v.score_map), quiet=True)
    return {
        "table": v.table,
        "name": v.name,
        "paper_f1": v.paper_f1,
        "cache": str(cache),
        "seconds": round(time.perf_counter() - t0, 1),
        **result,
    }


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40]


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    names = [name.split("/")[-1] for name in DATASETS]
    lines = [
        "# The paper's ablations on our data",
        "",
        f"Command: `{command}` (`fast` preset, default picking: automatic cutoff following the session). Our",
        "columns are means over the 7 distinct development sets; F1 at the automatic cutoff, AP over all candidates,",
        "the best global-cutoff F1 (chosen with the truth). The paper's column is its average F1 over five EMPIAR",
        "sets (Tables 3-7; its defaults: adjusted SCS, pre-training, max matching, 15 exemplars, stride window/8).",
        "",
        "| table | variant | F1 | AP | best global F1 | paper F1 | " + " | ".join(f"F1 {n}" for n in names) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        m = r["mean"]
        per = " | ".join(f"{r['rows'][d]['f1']:.3f}" for d in DATASETS)
        paper = "—" if r["paper_f1"] is None else f"{r['paper_f1']:.3f}"
        lines.append(
            f"| {r['table']} | {r['name']} | {m['f1']:.3f} | {m['ap']:.3f} | {m['oracle']:.3f} | {paper} | {per} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="the study cache root (default .study/)")
    p.add_argument(
        "--default-cache", type=Path, default=None, help="the default variant's cache (default: CACHE/ablation-default)"
    )
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "ablations.md")
    p.add_argument(
        "--missing", action="store_true", help="measure only the variants the table (its .json) does not hold yet"
    )
    p.add_argument("--only", action="append", default=[], help="measure only the variants whose name contains this")
    args = p.parse_args(argv)
    default = args.default_cache or args.cache / "ablation-default"
    # the rows an earlier, interrupted run measured stay in the table until this run measures them again
    json_out = args.out.with_suffix(".json")
    earlier = {r["name"]: r for r in json.loads(json_out.read_text())} if json_out.is_file() else {}
    order = [v.name for v in VARIANTS]
    measured: list[dict[str, Any]] = []
    for v in VARIANTS:
        if (args.missing and v.name in earlier) or (args.only and not any(o in v.name for o in args.only)):
            continue
        print(f"== table {v.table}: {v.name}", flush=True)
        measured.append(run_variant(v, args.cache, args.data_root, default))
        m = measured[-1]["mean"]
        print(f"   F1 {m['f1']:.3f} AP {m['ap']:.3f} best global F1 {m['oracle']:.3f}", flush=True)
        # written after every variant: a long run stopped early keeps what it measured
        done = {r["name"] for r in measured}
        rows = [*measured, *(r for name, r in earlier.items() if name not in done and name in order)]
        rows.sort(key=lambda r: order.index(r["name"]))
        # the rows may come from several runs (--missing and --only add rows): name the command that makes them all
        command = ".venv/bin/python tests/benchmarks/ablations.py"
        args.out.write_text(markdown(rows, command))
        json_out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
