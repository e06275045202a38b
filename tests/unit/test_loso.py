"""Choosing defaults leaving one sample out (tests/benchmarks/loso.py) and the study's exemplar draws: hand-made
F1 tables whose in-sample and held-out choices are worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.benchmarks import accuracy, loso, study
from tests.benchmarks.accuracy import BenchmarkError, Dataset


@pytest.mark.parametrize(
    ("dataset", "sample"),
    [
        ("empiar10017/bin4", "empiar10017"),
        ("empiar10017/full", "empiar10017"),
        ("empiar10017", "empiar10017"),
        ("sim/apoferritin", "sim/apoferritin"),
        ("sim/ruvab_crowded", "sim/ruvab_crowded"),
    ],
)
def test_the_sample_of_a_dataset(dataset: str, sample: str) -> None:
    assert loso.sample_of(dataset) == sample


# A wins on all three samples together (mean 0.567 against 0.533) by its lead on s1 and s2, but without s1 (or
# s2) B is ahead, because of A's loss on s3: two held-out samples of three choose B.
DIFFER = {
    "A": {"sim/s1": 0.7, "sim/s2": 0.7, "sim/s3": 0.3},
    "B": {"sim/s1": 0.5, "sim/s2": 0.5, "sim/s3": 0.6},
}


def test_in_sample_and_held_out_choices_differ() -> None:
    c = loso.choose(DIFFER)
    assert c.samples == ("sim/s1", "sim/s2", "sim/s3")
    assert c.in_sample == "A"
    assert c.in_sample_mean == pytest.approx(1.7 / 3, abs=1e-12)
    assert c.variant_mean["B"] == pytest.approx(1.6 / 3, abs=1e-12)
    assert [h.chosen for h in c.held_out] == ["B", "B", "A"]
    assert [h.f1 for h in c.held_out] == pytest.approx([0.5, 0.5, 0.3], abs=1e-12)
    assert [h.in_sample_f1 for h in c.held_out] == pytest.approx([0.7, 0.7, 0.3], abs=1e-12)
    assert c.loso_mean == pytest.approx(1.3 / 3, abs=1e-12)
    assert c.counts == {"A": 1, "B": 2}
    assert c.loso_choice == "B"
    assert not c.stable
    assert c.n_draws == 1


def test_the_report_of_differing_choices() -> None:
    text = loso.markdown(loso.choose(DIFFER))
    lines = text.splitlines()
    assert "| held-out sample | chosen on the other samples | its F1 | F1 of the in-sample choice `A` |" in lines
    assert "| sim/s1 | `B` | 0.500 | 0.700 |" in lines
    assert "| sim/s2 | `B` | 0.500 | 0.700 |" in lines
    assert "| sim/s3 | `A` | 0.300 | 0.300 |" in lines
    assert "| **mean** | leave one sample out | **0.433** | in sample **0.567** |" in lines
    assert "| `A` | 0.567 | 0.300 |" in lines
    assert "| `B` | 0.533 | 0.500 |" in lines
    decision = lines[-1]
    assert decision.startswith("The decision rests on the leave-one-sample-out choice `B`")
    assert "not on the in-sample choice `A`" in decision
    assert "held-out choices: `A` 1, `B` 2" in decision
    assert "leave-one-sample-out mean 0.433, in-sample mean 0.567" in decision
    assert "min" not in text  # one draw: no minimum column


def test_bin4_and_full_are_one_sample() -> None:
    # Counted as two samples, empiar10017 would weigh 2/4 and A would win (0.65 against 0.575); as one sample it
    # weighs 1/3 and B wins (0.6 against 0.567). A's empiar figure is the mean of bin4 and full: 0.9.
    figures = {
        "A": {"empiar10017/bin4": 0.8, "empiar10017/full": 1.0, "sim/a": 0.4, "sim/b": 0.4},
        "B": {"empiar10017/bin4": 0.5, "empiar10017/full": 0.5, "sim/a": 0.65, "sim/b": 0.65},
    }
    c = loso.choose(figures)
    assert c.samples == ("empiar10017", "sim/a", "sim/b")
    assert c.held_out[0].datasets == ("empiar10017/bin4", "empiar10017/full")
    assert c.sample_f1["A"]["empiar10017"] == pytest.approx(0.9, abs=1e-12)
    assert c.in_sample == "B"
    assert c.in_sample_mean == pytest.approx(1.8 / 3, abs=1e-12)
    # without empiar10017: A 0.4, B 0.65 -> B; without sim/a (or sim/b): A 0.65, B 0.575 -> A
    assert [h.chosen for h in c.held_out] == ["B", "A", "A"]
    assert [h.f1 for h in c.held_out] == pytest.approx([0.5, 0.4, 0.4], abs=1e-12)
    assert c.loso_mean == pytest.approx(1.3 / 3, abs=1e-12)
    assert c.loso_choice == "A"
    assert "| empiar10017 (bin4, full) | `B` | 0.500 | 0.500 |" in loso.markdown(c).splitlines()


def test_a_tie_keeps_the_variant_listed_first() -> None:
    same = {"sim/a": 0.5, "sim/b": 0.7, "sim/c": 0.6}
    first = loso.choose({"default": same, "other": dict(same)})
    assert first.in_sample == "default"
    assert [h.chosen for h in first.held_out] == ["default"] * 3
    assert first.stable
    assert first.loso_mean == pytest.approx(0.6, abs=1e-12)
    assert first.decision().startswith("The decision rests on `default`: it is chosen without each held-out sample")
    assert loso.choose({"other": same, "default": dict(same)}).in_sample == "other"
    # equal but for rounding (0.1 + 0.2 != 0.3): still a tie
    rounded = loso.choose({"B": {"sim/a": 0.3, "sim/b": 0.3}, "A": {"sim/a": 0.1 + 0.2, "sim/b": 0.3}})
    assert rounded.in_sample == "B"
    assert [h.chosen for h in rounded.held_out] == ["B", "B"]


def test_a_tie_between_held_out_choices_goes_to_the_variant_listed_first() -> None:
    # A: 0.5 on both samples together, B 0.45 -> A; without s1 B (0.6 > 0.2), without s2 A (0.8 > 0.3): one each
    figures = {"A": {"sim/s1": 0.8, "sim/s2": 0.2}, "B": {"sim/s1": 0.3, "sim/s2": 0.6}}
    c = loso.choose(figures)
    assert c.in_sample == "A"
    assert [h.chosen for h in c.held_out] == ["B", "A"]
    assert c.loso_mean == pytest.approx(0.25, abs=1e-12)
    assert c.loso_choice == "A"
    assert c.decision().startswith("The decision rests on `A`, the in-sample choice and the leave-one-sample-out")
    swapped = loso.choose({"B": figures["B"], "A": figures["A"]})
    assert swapped.in_sample == "A"
    assert swapped.loso_choice == "B"


def test_several_draws_give_the_mean_and_the_lowest_draw() -> None:
    figures = {
        # empiar10017 per draw: (0.8 + 0.4) / 2 = 0.6 and (0.4 + 0.8) / 2 = 0.6, so its lowest draw is 0.6 (the
        # lowest of each dataset, 0.4, would be wrong)
        "A": {
            "empiar10017/bin4": [0.8, 0.4],
            "empiar10017/full": [0.4, 0.8],
            "sim/a": [0.6, 0.4],
            "sim/b": [0.7, 0.5],
        },
        "B": {
            "empiar10017/bin4": [0.2, 0.2],
            "empiar10017/full": [0.2, 0.2],
            "sim/a": [0.5, 0.5],
            "sim/b": [0.9, 0.1],
        },
    }
    c = loso.choose(figures)
    assert c.n_draws == 2
    assert c.sample_f1["A"] == pytest.approx({"empiar10017": 0.6, "sim/a": 0.5, "sim/b": 0.6}, abs=1e-12)
    assert c.sample_min["A"] == pytest.approx({"empiar10017": 0.6, "sim/a": 0.4, "sim/b": 0.5}, abs=1e-12)
    assert c.sample_f1["B"]["sim/b"] == pytest.approx(0.5, abs=1e-12)
    assert c.sample_min["B"]["sim/b"] == pytest.approx(0.1, abs=1e-12)
    assert c.in_sample == "A"
    assert [h.chosen for h in c.held_out] == ["A", "A", "A"]
    assert [h.f1_min for h in c.held_out] == pytest.approx([0.6, 0.4, 0.5], abs=1e-12)
    assert c.loso_mean == pytest.approx(1.7 / 3, abs=1e-12)
    lines = loso.markdown(c).splitlines()
    assert lines[0].startswith("Figure: F1 at the automatic cutoff, mean over 2 exemplar draws")
    assert "| sim/a | `A` | 0.500 (min 0.400) | 0.500 (min 0.400) |" in lines
    assert "| `B` | 0.400 | 0.200 | 0.100 |" in lines


def test_one_figure_is_one_draw() -> None:
    plain = loso.choose(DIFFER)
    listed = loso.choose({v: {d: [f] for d, f in rows.items()} for v, rows in DIFFER.items()})
    assert listed == plain


@pytest.mark.parametrize(
    ("figures", "message"),
    [
        ({"A": {"sim/a": 0.5}, "B": {"sim/a": 0.6}}, "at least two samples"),
        ({"A": {"empiar10017/bin4": 0.5, "empiar10017/full": 0.6}}, "at least two samples"),
        ({"A": {"sim/a": 0.5, "sim/b": 0.5}, "B": {"sim/a": 0.5}}, "has datasets"),
        ({"A": {"sim/a": [0.5, 0.4], "sim/b": [0.5]}}, "2 draws"),
        ({}, "no variants"),
    ],
)
def test_malformed_tables_are_refused(figures: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loso.choose(figures)


def test_the_grid_lists_every_combination_defaults_first() -> None:
    variants = study.grid(["threshold=auto,gmm", "nms_distance=0.4,0.3"])
    assert variants == [
        ("threshold=auto nms_distance=0.4", {"threshold": "auto", "nms_distance": 0.4}),
        ("threshold=auto nms_distance=0.3", {"threshold": "auto", "nms_distance": 0.3}),
        ("threshold=gmm nms_distance=0.4", {"threshold": "gmm", "nms_distance": 0.4}),
        ("threshold=gmm nms_distance=0.3", {"threshold": "gmm", "nms_distance": 0.3}),
    ]
    for bad in (["threshold"], ["threshold="], ["nms_distance=0.4,0.4"], ["nms=true", "nms=false"]):
        with pytest.raises(BenchmarkError):
            study.grid(bad)


def _dataset(root: Path, n_particles: int) -> Dataset:
    (root / "micrographs").mkdir(parents=True)
    (root / "coords").mkdir()
    (root / "dataset.json").write_text(json.dumps({"particle_diameter_px": 20}))
    for stem in ("m0", "m1"):
        (root / "micrographs" / f"{stem}.mrc").write_bytes(b"")  # listed, never read by the split
        rows = "".join(f"{10.0 + i}\t{20.0 + i}\n" for i in range(n_particles))
        (root / "coords" / f"{stem}.star").write_text(f"data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n{rows}")
    return Dataset("sim/x", root)


def test_a_cache_of_another_draw_splits_with_its_seed(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "data", 40)
    default, drawn = tmp_path / "default", tmp_path / "draw3"
    default.mkdir()
    study._record(default, None, None)
    assert not (default / "study.json").exists()  # the default cache is as before
    drawn.mkdir()
    study._record(drawn, None, 3)
    assert json.loads((drawn / "study.json").read_text()) == {"draw": 3}
    want = {seed: np.random.default_rng(seed).choice(40, 15, replace=False).tolist() for seed in (0, 3)}
    assert want[0] != want[3]
    assert study._split(ds, default).exemplar_rows == want[0]
    assert study._split(ds, drawn).exemplar_rows == want[3]
    assert (accuracy.EXEMPLAR_SEED, accuracy.N_EXEMPLARS) == (0, 15)  # restored
    study._record(drawn, 5, None)  # the exemplar count joins the draw
    assert json.loads((drawn / "study.json").read_text()) == {"draw": 3, "exemplars": 5}
    assert study._split(ds, drawn).exemplar_rows == np.random.default_rng(3).choice(40, 5, replace=False).tolist()


def test_a_trained_cache_refuses_another_draw(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "sim__x" / "model").mkdir(parents=True)
    (cache / "sim__x" / "model" / "manifest.json").write_text("{}")
    study._record(cache, None, 0)  # the draw it was trained on: fine
    with pytest.raises(BenchmarkError, match="trained on draw 0, not 2"):
        study._record(cache, None, 2)


def test_choose_scores_every_combination_on_every_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sub-command's wiring, with the cached maps and their scoring stood in for: F1 = a per-dataset base,
    +0.1 on s1 and -0.2 on s2 for nms_distance 0.3, plus 0.1 on the second cache (draw)."""
    base = {"sim/s1": 0.5, "sim/s2": 0.6, "sim/s3": 0.4}
    shift = {"sim/s1": 0.1, "sim/s2": -0.2, "sim/s3": 0.0}
    seen: list[tuple[str, float, str]] = []

    class Fake:
        def __init__(self, name: str, cache: Path) -> None:
            self.name, self.cache = name, cache

    def fake_load(data_root: Path, cache: Path, names: object = None) -> list[Fake]:
        return [Fake(n, cache) for n in base]

    def fake_table(cached: list[Fake], cfg: object, quiet: bool = False) -> dict:
        nms = float(cfg.nms_distance)  # type: ignore[attr-defined]
        seen.append((cached[0].cache.name, nms, str(cfg.threshold)))  # type: ignore[attr-defined]
        draw = 0.1 if cached[0].cache.name == "draw-1" else 0.0
        rows = {c.name: {"f1": base[c.name] + draw + (shift[c.name] if nms == 0.3 else 0.0)} for c in cached}
        return {"rows": rows, "mean": {"f1": float(np.mean([r["f1"] for r in rows.values()]))}}

    monkeypatch.setattr(study, "load", fake_load)
    monkeypatch.setattr(study, "table", fake_table)
    out, doc = tmp_path / "choice.md", tmp_path / "choice.json"
    argv = ["choose", "--grid", "nms_distance=0.4,0.3", "--pick-set", "threshold=gmm"]
    argv += ["--cache", str(tmp_path / "draw-0"), "--cache", str(tmp_path / "draw-1"), "--out", str(out)]
    assert study.main([*argv, "--json", str(doc)]) == 0
    assert seen == [("draw-0", 0.4, "gmm"), ("draw-0", 0.3, "gmm"), ("draw-1", 0.4, "gmm"), ("draw-1", 0.3, "gmm")]
    result = json.loads(doc.read_text())
    assert result["figures"]["nms_distance=0.3"]["sim/s1"] == pytest.approx([0.6, 0.7], abs=1e-12)
    # in sample: 0.4 has 0.55 on average, 0.3 0.516; without s2, 0.3 wins (0.55 against 0.5)
    assert result["in_sample"] == "nms_distance=0.4"
    assert [h["chosen"] for h in result["held_out"]] == ["nms_distance=0.4", "nms_distance=0.3", "nms_distance=0.4"]
    assert result["loso_mean"] == pytest.approx((0.55 + 0.45 + 0.45) / 3, abs=1e-12)
    lines = out.read_text().splitlines()
    assert lines[0].startswith(
        "Command: `.venv/bin/python tests/benchmarks/study.py choose --grid nms_distance=0.4,0.3"
    )
    assert "| sim/s2 | `nms_distance=0.3` | 0.450 (min 0.400) | 0.650 (min 0.600) |" in lines
    with pytest.raises(SystemExit):  # a key both fixed and chosen among
        study.main(["choose", "--grid", "threshold=auto,gmm", "--pick-set", "threshold=auto"])
    with pytest.raises(SystemExit):  # the draw belongs to prepare
        study.main(["evaluate", "--draw", "1"])


def _row(f1: float, **extra: float | None) -> dict:
    return {
        "recall": 0.9,
        "ap": f1 - 0.1,
        "oracle": f1 + 0.1,
        "f1": f1,
        "ratio": f1 / (f1 + 0.1),
        "count_err": 0.2,
        **extra,
    }


def test_evaluate_over_draws_gives_each_figure_its_mean_and_its_lowest_draw() -> None:
    carbon = {"precision_carbon": None, "precision_no_carbon": 0.8, "junk_share": 0.1}
    draws = [
        {"rows": {"sim/a": _row(0.6, **carbon), "sim/b": _row(0.4)}},
        {"rows": {"sim/a": _row(0.8, **{**carbon, "precision_no_carbon": 0.6}), "sim/b": _row(0.2)}},
    ]
    result = study.over_draws(draws)
    a, b = result["rows"]["sim/a"], result["rows"]["sim/b"]
    assert (a["f1"], a["f1_min"], b["f1"], b["f1_min"]) == pytest.approx((0.7, 0.6, 0.3, 0.2), abs=1e-12)
    assert a["ap"] == pytest.approx(0.6, abs=1e-12) and a["ap_min"] == pytest.approx(0.5, abs=1e-12)
    # a figure no draw can give stays unknown; one that some draws give is their mean
    assert a["precision_carbon"] is None and a["precision_no_carbon"] == pytest.approx(0.7, abs=1e-12)
    assert "junk_share" not in b
    assert result["mean"]["f1"] == pytest.approx(0.5, abs=1e-12)
    assert result["mean"]["f1_min"] == pytest.approx(0.4, abs=1e-12)
    text = study.markdown(result, "cmd")
    assert "Means over 2 exemplar draws; in brackets the lowest draw." in text
    assert "| sim/b | 0.900 (0.900) | 0.200 (0.100) | 0.400 (0.300) | 0.300 (0.200) |" in text
    assert "| sim/a | — | 0.700 | — | 0.100 |" in text  # carbon: no micrograph with carbon in either draw
    with pytest.raises(BenchmarkError, match="different datasets"):
        study.over_draws([draws[0], {"rows": {"sim/a": _row(0.5)}}])
