"""The side-by-side report of tests/benchmarks/compare.py: cryomae over several exemplar draws, issue 24's bars per
sample, and a saved run amended by a later one, on hand-made rows whose figures are worked out by hand."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tests.benchmarks import compare
from tests.benchmarks.accuracy import Row


def _row(picker: str, f1: float, oracle: float | None = None, draw: int | None = None, ap: float = 0.5) -> Row:
    details: dict[str, Any] = {} if draw is None else {compare.DRAW: draw}
    return Row(
        picker=picker,
        precision=f1,
        recall=f1,
        f1=f1,
        tp=1,
        n_picks=2,
        n_truth=2,
        ap=ap,
        n_queries=1,
        pick_s_per_micrograph=0.5,
        oracle=None if oracle is None else {"f1": oracle},
        details=details,
    )


def _dataset(protocol: float, draws: list[float], oracle: float, peers: dict[str, float]) -> list[Row]:
    """Rows as ``run_dataset`` orders them: the extra draws, the protocol's row, then the peers."""
    rows = [_row("cryomae fast", f, oracle, draw=k) for k, f in enumerate(draws, start=1)]
    rows.append(_row("cryomae fast", protocol, oracle))
    return rows + [_row(name, f) for name, f in peers.items()]


RESULTS = {
    # one sample at two binnings: its figures are the means of the two datasets'
    "empiar10017/bin4": _dataset(0.70, [0.60, 0.80], 0.75, {"DoG": 0.60, "Topaz": 0.50}),
    "empiar10017/full": _dataset(0.80, [0.70, 0.90], 0.85, {"DoG": 0.60, "Topaz": 0.70}),
    # ahead of the peer on the protocol's draw, behind it over the draws, and below 0.92 x its best cutoff
    "sim/x": _dataset(0.60, [0.30, 0.30], 0.60, {"DoG": 0.50, "Topaz": 0.20}),
}


def test_the_draws_of_a_spec_are_its_protocol_row_and_its_extra_rows() -> None:
    drawn = compare.over_draws(RESULTS["sim/x"])
    assert drawn is not None
    main = drawn[0]
    assert main.details == {} and main.f1 == 0.60
    assert [r.f1 for r in drawn] == [0.60, 0.30, 0.30]
    assert compare.over_draws([_row("DoG", 0.5)]) is None
    line = compare.draws_line(drawn)
    assert "F1 mean **0.400**, lowest 0.300 (draw 1)" in line


def test_issue_24s_bars_per_sample() -> None:
    lines = compare.sample_bars(RESULTS)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    # EMPIAR-10017: protocol (0.70 + 0.80) / 2, draws (0.70, 0.60, 0.80) and (0.80, 0.70, 0.90) -> 0.65, 0.75, 0.85
    # per draw (mean 0.75, lowest 0.65); best peer Topaz (0.50 + 0.70) / 2 = 0.60 against DoG 0.60: the first wins
    # a tie, DoG; oracle (0.75 + 0.85) / 2 = 0.80 -> 0.92 x 0.80 = 0.736
    assert rows["empiar10017"].split(" | ")[1:] == ["0.750", "0.750 (0.650)", "0.600 DoG", "0.736", "met |"]
    # sim/x: ahead of DoG (0.50) on the protocol's draw, 0.40 over the draws: below it and below 0.92 x 0.60
    bars = rows["sim/x"].split(" | ")
    assert bars[1:4] == ["0.600", "0.400 (0.300)", "0.500 DoG"]
    assert "below the peer over the draws" in bars[5] and "below 0.92 x best cutoff" in bars[5]
    assert "protocol's draw" not in bars[5]
    mean = next(line for line in lines if line.startswith("| **mean of 2 samples**"))
    assert "**0.675**" in mean and "**0.575**" in mean and "DoG 0.550" in mean and "Topaz 0.400" in mean


def test_a_saved_run_amended_by_a_later_one(tmp_path: Path) -> None:
    """The later run's rows replace the saved run's of the same picker and draw, the other pickers' rows stay; the
    report names the later run. Uses the development data's coordinates for the splits (no micrograph is read)."""

    def saved(commit: str, results: dict[str, list[Row]]) -> Path:
        path = tmp_path / f"{commit}.json"
        meta = {
            "commit": commit,
            "date": "2026-12-07 20:00 UTC",
            "command": f"compare.py run {commit}",
            "total_s": 600.0,
            "machine": {"cpu_model": "cpu", "processor": "", "cpu_count": 2, "torch": "2", "cuda_device": None},
            "device": "cpu",
            "max_queries": 1,
        }
        doc = {"meta": meta, "results": {n: [dataclasses.asdict(r) for r in rows] for n, rows in results.items()}}
        path.write_text(json.dumps(doc))
        return path

    first = saved(
        "aaaaaaa",
        {
            "sim/apoferritin": [_row("DoG", 0.4)],
            "sim/tric": [_row("cryomae fast", 0.5, draw=1), _row("cryomae fast", 0.6), _row("DoG", 0.3)],
        },
    )
    # cryomae's rows of sim/tric again (the protocol's draw and draw 1), and a picker the first run did not have
    later = saved(
        "bbbbbbb",
        {"sim/tric": [_row("cryomae fast", 0.8, draw=1), _row("cryomae fast", 0.9), _row("cryomae small", 0.7)]},
    )
    out = tmp_path / "benchmarks.md"
    # report_again, not main: main configures the process's logging, which other tests capture
    args = compare.build_parser().parse_args(["--from-json", str(first), "--amend-with", str(later), "--out", str(out)])
    assert compare.report_again(args) == 0
    report = out.read_text()
    assert "Amended: the rows of cryomae fast, cryomae small on sim/tric re-run at commit bbbbbbb" in report
    merged = json.loads(out.with_suffix(".json").read_text())
    tric = [(r["picker"], r["details"].get(compare.DRAW), r["f1"]) for r in merged["results"]["sim/tric"]]
    # each later row in its picker's and draw's place, DoG's row of the first run kept, the new picker last
    assert tric == [
        ("cryomae fast", 1, 0.8),
        ("cryomae fast", None, 0.9),
        ("DoG", None, 0.3),
        ("cryomae small", None, 0.7),
    ]
    assert merged["results"]["sim/apoferritin"][0]["f1"] == 0.4
    assert merged["meta"]["commit"] == "aaaaaaa" and merged["meta"]["amended"][0]["datasets"] == ["sim/tric"]
    # an amendment saved before rows were merged per picker (no "pickers"): whole datasets, as it was
    old = {"commit": "ccccccc", "date": "d", "command": "c", "total_s": 60.0, "datasets": ["sim/x"]}
    assert compare._amended_line(old).startswith("Amended: sim/x re-run at commit ccccccc")
