"""The `cryomae` command end to end on small synthetic micrographs: train -> pick -> evaluate -> preview.

Everything goes through ``cryomae.operator.cli.main([...])`` (its exit code, stdout and stderr) and real files. The
model is the tiny `test` preset trained for a few steps, so the tests check the plumbing, formats and error
handling, not picking accuracy (tests/e2e/test_engine.py does that).
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import structlog
from PIL import Image

from cryomae.config import PickConfig, TrainConfig
from cryomae.gallery.render import KEPT_COLOUR, REJECTED_COLOUR, TRUTH_COLOUR
from cryomae.io import Coordinates, write_coordinates, write_mrc
from cryomae.operator.cli import build_parser, main
from cryomae.synthetic import make_micrograph

DIAMETER = 20.0
SIDE = 256
TINY = [
    "--preset",
    "test",
    "--device",
    "cpu",
    "--set",
    "pretrain_epochs=1",
    "--set",
    "epochs=2",
    "--set",
    "pretrain_regions=128",
    "--set",
    "n_unlabeled=64",
]
AUTOPICK_COLUMNS = [
    "_rlnCoordinateX",
    "_rlnCoordinateY",
    "_rlnClassNumber",
    "_rlnAutopickFigureOfMerit",
    "_rlnAnglePsi",
]


def cli(*argv: object) -> tuple[int, str, str]:
    """Run ``main`` with stdout and stderr captured; returns (exit code, stdout, stderr).

    ``main`` configures structlog to write to the stderr of the moment; the previous configuration is put
    back afterwards so that later tests do not log into a closed capture stream.
    """
    out, err = io.StringIO(), io.StringIO()
    saved = structlog.get_config()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        structlog.configure(**saved)
    return code, out.getvalue(), err.getvalue()


def read_loop(path: Path) -> tuple[str, list[str], list[list[str]]]:
    """A minimal reader of a one-loop STAR file: (block name, column labels, rows of tokens)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    block = next(line for line in lines if line.startswith("data_"))
    j = lines.index("loop_") + 1
    columns = []
    while j < len(lines) and lines[j].startswith("_"):
        columns.append(lines[j].split()[0])
        j += 1
    rows = [shlex.split(line) for line in lines[j:] if line and not line.startswith("#")]
    assert all(len(r) == len(columns) for r in rows), f"{path}: ragged loop"
    return block, columns, rows


@dataclass
class Run:
    root: Path
    mics: list[Path]  # micrograph paths exactly as given on the command line
    truth: Path  # directory of <stem>.star ground truth
    exemplars: Path
    model: Path
    picks: Path
    train_stdout: str
    pick_stdout: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Three synthetic micrographs; train on 10 exemplars of the first, pick the other two."""
    root = tmp_path_factory.mktemp("cli")
    (root / "mics").mkdir()
    truth = root / "truth"
    truth.mkdir()
    mics = []
    centres0 = np.zeros((0, 2))
    for i in range(3):
        m = make_micrograph(shape=(SIDE, SIDE), diameter=DIAMETER, n_particles=20, seed=i)
        path = root / "mics" / f"mic_{i}.mrc"
        write_mrc(path, m.image, pixel_size=1.5)
        write_coordinates(truth / f"mic_{i}.star", Coordinates(m.centres))
        mics.append(path)
        if i == 0:
            centres0 = m.centres
    exemplars = root / "exemplars.star"
    write_coordinates(exemplars, Coordinates(centres0[:10]))
    model = root / "model"
    code, train_out, err = cli("train", mics[0], "--coords", exemplars, "--diameter", DIAMETER, "--out", model, *TINY)
    assert code == 0, err
    picks = root / "picks"
    code, pick_out, err = cli("pick", mics[1], mics[2], "--model", model, "--out", picks, "--device", "cpu")
    assert code == 0, err
    return Run(root, mics, truth, exemplars, model, picks, train_out, pick_out)


# ------------------------------------------------------------------------------------------------- train


def test_train_writes_a_model_directory_with_its_manifest(run):
    assert f"model written to {run.model}" in run.train_stdout
    assert sorted(p.name for p in run.model.iterdir()) == ["manifest.json", "weights.safetensors"]
    manifest = json.loads((run.model / "manifest.json").read_text())
    assert manifest["preset"]["name"] == "test"
    geometry = manifest["geometry"]
    expected = (DIAMETER, TrainConfig().box_factor, 24)
    assert (geometry["diameter"], geometry["box_factor"], geometry["img_size"]) == expected
    hp = manifest["hyperparameters"]
    assert (hp["pretrain_epochs"], hp["epochs"], hp["pretrain_regions"], hp["n_unlabeled"]) == (1, 2, 128, 64)
    assert hp["seed"] == 0 and hp["device"] == "cpu"
    prov = manifest["provenance"]
    assert prov["exemplar_file"] == str(run.exemplars)
    assert prov["reference_micrograph"] == str(run.mics[0])
    assert prov["reference_shape"] == [SIDE, SIDE] and prov["pixel_size"] == pytest.approx(1.5)
    assert len(prov["exemplars"]) == 10
    assert manifest["exemplar_bank"]["size"] == 10 * 8, "8 dihedral views per exemplar"
    assert len(manifest["weights"]["sha256"]) == 64
    assert not [p for p in run.root.iterdir() if p.name.startswith(".")], "no temporary directories left"


def _sha(model_dir: Path) -> str:
    return str(json.loads((model_dir / "manifest.json").read_text())["weights"]["sha256"])


def test_training_is_deterministic_for_a_seed(run, tmp_path):
    again = tmp_path / "again"
    args = ("train", run.mics[0], "--coords", run.exemplars, "--diameter", DIAMETER, *TINY)
    code, _, err = cli(*args, "--out", again, "--seed", 0)
    assert code == 0, err
    assert _sha(again) == _sha(run.model)
    # another seed, given through a JSON config file (whose epochs=7 the --set epochs=2 of TINY overrides)
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"seed": 1, "epochs": 7}))
    other = tmp_path / "other"
    code, _, err = cli(*args, "--out", other, "--config", config)
    assert code == 0, err
    hp = json.loads((other / "manifest.json").read_text())["hyperparameters"]
    assert (hp["seed"], hp["epochs"]) == (1, 2)
    assert _sha(other) != _sha(run.model)


# -------------------------------------------------------------------------------------------------- pick


def test_pick_writes_a_relion_autopick_star_per_micrograph(run):
    summary = json.loads((run.picks / "pick_run.json").read_text())
    rows = {r["micrograph"]: r for r in summary["micrographs"]}
    for mic in run.mics[1:]:
        star = run.picks / f"{mic.stem}_autopick.star"
        block, columns, loop = read_loop(star)
        assert block == "data_"
        assert columns == AUTOPICK_COLUMNS
        assert len(loop) == rows[str(mic)]["picks"] > 0
        values = np.array(loop, dtype=np.float64)
        assert ((values[:, :2] >= 0) & (values[:, :2] <= SIDE - 1)).all(), "picks inside the image"
        assert (values[:, 2] == 0).all() and (values[:, 4] == 0).all()
        fom = values[:, 3]
        assert (np.diff(fom) <= 0).all(), "picks are listed best first"
        assert fom.min() >= rows[str(mic)]["threshold"] - 1e-6, "every pick is at or above the cutoff"
        # the candidates file holds every scored candidate: the picks and those below the cutoff
        _, ccols, cand = read_loop(run.picks / "candidates" / f"{mic.stem}_candidates.star")
        assert ccols[:3] == ["_rlnCoordinateX", "_rlnCoordinateY", "_rlnAutopickFigureOfMerit"]
        cvalues = np.array(cand, dtype=np.float64)
        assert len(cand) == rows[str(mic)]["candidates"] >= len(loop)
        np.testing.assert_allclose(cvalues[: len(loop), :2], values[:, :2], atol=0.006)
        assert (cvalues[len(loop) :, 2] < rows[str(mic)]["threshold"]).all()
    assert not (run.picks / f"{run.mics[0].stem}_autopick.star").exists(), "only the micrographs given"


def test_pick_writes_the_coordinate_index_with_micrograph_names_as_given(run):
    block, columns, rows = read_loop(run.picks / "autopick.star")
    assert block == "data_coordinate_files"
    assert columns == ["_rlnMicrographName", "_rlnMicrographCoordinates"]
    assert [r[0] for r in rows] == [str(m) for m in run.mics[1:]]
    assert [Path(r[1]) for r in rows] == [run.picks / f"{m.stem}_autopick.star" for m in run.mics[1:]]
    assert all(Path(r[1]).is_file() for r in rows)


def test_pick_writes_particles_star_and_the_run_summary(run):
    summary = json.loads((run.picks / "pick_run.json").read_text())
    assert summary["model"] == str(run.model)
    assert summary["diameter"] == DIAMETER
    assert summary["options"]["device"] == "cpu" and summary["options"]["threshold"] == "auto"
    assert summary["failed"] == []
    assert [r["micrograph"] for r in summary["micrographs"]] == [str(m) for m in run.mics[1:]]
    total = sum(r["picks"] for r in summary["micrographs"])
    assert summary["total_picks"] == total
    # the micrographs of one run are one session: after a trusted mixture cut, an untrusted one takes the session's
    rules = [r["cutoff_rule"] for r in summary["micrographs"]]
    assert set(rules) <= {"gmm", "session", "robust", "few"}
    first_trusted = rules.index("gmm") if "gmm" in rules else len(rules)
    assert "robust" not in rules[first_trusted:]
    version = _sha(run.model)[:12]
    assert summary["model_version"] == version

    block, columns, rows = read_loop(run.picks / "particles.star")
    assert block == "data_particles"
    assert columns == [
        "_rlnMicrographName",
        "_rlnCoordinateX",
        "_rlnCoordinateY",
        "_rlnAutopickFigureOfMerit",
        "_cryomaeModelVersion",
    ]
    assert len(rows) == total
    for r in summary["micrographs"]:
        assert sum(row[0] == r["micrograph"] for row in rows) == r["picks"]
    assert {row[4] for row in rows} == {version}
    # the same picks as the per-micrograph files, in the same order
    mine = [row for row in rows if row[0] == str(run.mics[1])]
    _, _, auto = read_loop(run.picks / f"{run.mics[1].stem}_autopick.star")
    np.testing.assert_allclose(
        np.array([r[1:3] for r in mine], dtype=float), np.array([r[:2] for r in auto], dtype=float), atol=0.006
    )
    for mic in run.mics[1:]:
        line = f"{mic}: {summary['micrographs'][run.mics.index(mic) - 1]['picks']} picks"
        assert line in run.pick_stdout
    assert f"{total} picks on 2 micrographs -> {run.picks}" in run.pick_stdout


def test_pick_json_prints_the_summary(run, tmp_path):
    out = tmp_path / "picks"
    code, stdout, err = cli("pick", run.mics[1], "--model", run.model, "--out", out, "--device", "cpu", "--json")
    assert code == 0, err
    printed = json.loads(stdout)
    written = json.loads((out / "pick_run.json").read_text())
    assert printed == written
    assert printed["micrographs"][0]["micrograph"] == str(run.mics[1])
    # the same model on the same micrograph picks the same particles as before
    _, _, before = read_loop(run.picks / f"{run.mics[1].stem}_autopick.star")
    _, _, now = read_loop(out / f"{run.mics[1].stem}_autopick.star")
    assert now == before


def test_pick_skips_an_unreadable_micrograph_and_reports_it(run, tmp_path):
    bad = tmp_path / "broken.mrc"
    bad.write_bytes(b"this is not an MRC file " * 100)
    out = tmp_path / "picks"
    code, _, err = cli("pick", run.mics[1], bad, run.mics[2], "--model", run.model, "--out", out, "--device", "cpu")
    assert code == 0, err
    summary = json.loads((out / "pick_run.json").read_text())
    assert [r["micrograph"] for r in summary["micrographs"]] == [str(run.mics[1]), str(run.mics[2])]
    assert len(summary["failed"]) == 1
    assert summary["failed"][0]["micrograph"] == str(bad)
    assert str(bad) in summary["failed"][0]["error"]
    assert str(bad) in err, "the failure is logged"
    for mic in run.mics[1:]:
        assert (out / f"{mic.stem}_autopick.star").is_file()
    assert not (out / "broken_autopick.star").exists()
    _, _, index = read_loop(out / "autopick.star")
    assert [r[0] for r in index] == [str(run.mics[1]), str(run.mics[2])]


def test_pick_fails_when_no_micrograph_can_be_read(run, tmp_path):
    bad = tmp_path / "broken.mrc"
    bad.write_bytes(b"\x00" * 2000)
    out = tmp_path / "picks"
    code, _, err = cli("pick", bad, "--model", run.model, "--out", out, "--device", "cpu")
    assert code == 1
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and f"error: {bad}: no micrograph could be read" in message[0]
    assert json.loads((out / "pick_run.json").read_text())["failed"][0]["micrograph"] == str(bad)


def test_pick_with_a_tampered_model_fails_naming_the_weights(run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(run.model, model)
    weights = model / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "picks"
    code, stdout, err = cli("pick", run.mics[1], "--model", model, "--out", out, "--device", "cpu")
    assert code == 1
    assert stdout == ""
    assert "error:" in err and str(weights) in err and "checksum" in err
    assert not out.exists(), "nothing is written with a model that fails verification"


def test_pick_of_a_directory_that_is_no_model_fails(run, tmp_path):
    code, _, err = cli("pick", run.mics[1], "--model", tmp_path, "--out", tmp_path / "picks", "--device", "cpu")
    assert code == 1
    assert str(tmp_path) in err and "manifest.json" in err


def test_pick_refuses_micrographs_with_the_same_stem(run, tmp_path):
    for d, src in (("a", run.mics[1]), ("b", run.mics[2])):
        (tmp_path / d).mkdir()
        shutil.copyfile(src, tmp_path / d / "mic.mrc")
    out = tmp_path / "picks"
    code, _, err = cli(
        "pick", tmp_path / "a" / "mic.mrc", tmp_path / "b" / "mic.mrc", "--model", run.model, "--out", out
    )
    assert code == 1
    assert str(tmp_path / "b" / "mic.mrc") in err and "same name stem" in err
    assert not (out / "mic_autopick.star").exists()


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_prints_a_table(run):
    code, stdout, err = cli("evaluate", "--picks", run.picks, "--truth", run.truth, "--diameter", DIAMETER)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["micrograph", "picks", "truth", "TP", "prec", "recall", "F1"]
    names = [line.split()[0] for line in lines[2:]]
    assert "mic_1" in names and "mic_2" in names and "pooled" in names
    assert "mic_0" not in names, "only the picked micrographs are scored"
    assert lines[-1].startswith("average precision: ")
    float(lines[-1].split(": ")[1])


def test_evaluate_json_has_pooled_precision_recall_f1(run):
    code, stdout, err = cli("evaluate", "--picks", run.picks, "--truth", run.truth, "--diameter", DIAMETER, "--json")
    assert code == 0, err
    ev = json.loads(stdout)
    pooled = ev["pooled"]
    summary = json.loads((run.picks / "pick_run.json").read_text())
    assert pooled["n_picks"] == summary["total_picks"]
    assert pooled["n_truth"] == 40, "20 particles on each of the two picked micrographs"
    assert 0 <= pooled["tp"] <= min(pooled["n_picks"], pooled["n_truth"])
    assert pooled["precision"] == pytest.approx(pooled["tp"] / pooled["n_picks"])
    assert pooled["recall"] == pytest.approx(pooled["tp"] / pooled["n_truth"])
    assert pooled["f1"] == pytest.approx(2 * pooled["tp"] / (pooled["n_picks"] + pooled["n_truth"]))
    assert set(ev["per_micrograph"]) == {"mic_1", "mic_2"}
    assert sum(s["tp"] for s in ev["per_micrograph"].values()) == pooled["tp"]
    assert ev["average_precision"] is not None and 0.0 <= ev["average_precision"] <= 1.0
    # the table shows the same pooled numbers
    _, table, _ = cli("evaluate", "--picks", run.picks, "--truth", run.truth, "--diameter", DIAMETER)
    row = next(line for line in table.splitlines() if line.startswith("pooled")).split()
    assert row[1:4] == [str(pooled["n_picks"]), str(pooled["n_truth"]), str(pooled["tp"])]
    assert row[6] == f"{pooled['f1']:.3f}"


def test_evaluate_names_a_missing_ground_truth_file(run, tmp_path):
    code, _, err = cli("evaluate", "--picks", run.picks, "--truth", tmp_path, "--diameter", DIAMETER)
    assert code == 1
    assert str(tmp_path / "mic_1.star") in err


# ----------------------------------------------------------------------------------------------- preview


def _png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_preview_with_and_without_diameter(run, tmp_path):
    picks = run.picks / f"{run.mics[1].stem}_autopick.star"
    given = tmp_path / "given.png"
    code, stdout, err = cli(
        "preview",
        run.mics[1],
        "--picks",
        picks,
        "--out",
        given,
        "--diameter",
        DIAMETER,
        "--truth",
        run.truth / "mic_1.star",
    )
    assert code == 0, err
    assert f"preview written to {given}" in stdout
    rgb = _png(given)
    assert rgb.shape == (SIDE, SIDE, 3)
    assert ((rgb == KEPT_COLOUR).all(-1)).sum() > 0, "yellow pick circles"
    assert ((rgb == TRUTH_COLOUR).all(-1)).sum() > 0, "bluish green ground-truth circles"
    # the candidates just below the cutoff, from the candidates/ folder `cryomae pick` wrote
    assert ((rgb == REJECTED_COLOUR).all(-1)).sum() > 0, "sky blue rejected candidates"
    small = tmp_path / "small.png"
    assert cli("preview", run.mics[1], "--picks", picks, "--out", small, "--size", 128, "--no-legend")[0] == 0
    assert _png(small).shape == (128, 128, 3)

    # without --diameter it comes from pick_run.json beside the picks: the same picture
    from_run, with_20 = tmp_path / "from_run.png", tmp_path / "with_20.png"
    assert cli("preview", run.mics[1], "--picks", picks, "--out", from_run)[0] == 0
    assert cli("preview", run.mics[1], "--picks", picks, "--out", with_20, "--diameter", DIAMETER)[0] == 0
    assert np.array_equal(_png(from_run), _png(with_20))
    wider = tmp_path / "wider.png"
    assert cli("preview", run.mics[1], "--picks", picks, "--out", wider, "--diameter", 2 * DIAMETER)[0] == 0
    assert not np.array_equal(_png(wider), _png(with_20))


def test_preview_without_diameter_or_pick_run_fails(run, tmp_path):
    picks = tmp_path / "picks.star"
    shutil.copyfile(run.picks / f"{run.mics[1].stem}_autopick.star", picks)
    out = tmp_path / "p.png"
    code, _, err = cli("preview", run.mics[1], "--picks", picks, "--out", out)
    assert code == 1
    assert str(picks) in err and "--diameter" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------- bad inputs


def _train_bad(tmp_path: Path, reference: Path, coords: Path) -> tuple[int, str, Path]:
    out = tmp_path / "model"
    code, _, err = cli("train", reference, "--coords", coords, "--diameter", DIAMETER, "--out", out, *TINY)
    return code, err, out


def test_train_refuses_exemplars_outside_the_image(run, tmp_path):
    coords = tmp_path / "outside.star"
    write_coordinates(coords, Coordinates(np.array([[100.0, 100.0], [SIDE + 20.0, 50.0]])))
    code, err, out = _train_bad(tmp_path, run.mics[0], coords)
    assert code == 1
    assert f"error: {coords}:" in err and "outside" in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["empty-loop", "zero-bytes", "header-only-csv"])
def test_train_refuses_an_empty_exemplar_file(run, tmp_path, kind):
    if kind == "empty-loop":
        coords = tmp_path / "none.star"
        write_coordinates(coords, Coordinates(np.zeros((0, 2))))
    elif kind == "zero-bytes":
        coords = tmp_path / "none.star"
        coords.write_bytes(b"")
    else:
        coords = tmp_path / "none.csv"
        coords.write_text("x,y\n")
    code, err, out = _train_bad(tmp_path, run.mics[0], coords)
    assert code == 1
    assert f"error: {coords}:" in err
    assert not out.exists()


def test_train_refuses_a_truncated_mrc_reference(run, tmp_path):
    ref = tmp_path / "truncated.mrc"
    data = run.mics[0].read_bytes()
    ref.write_bytes(data[: len(data) // 2])
    code, err, out = _train_bad(tmp_path, ref, run.exemplars)
    assert code == 1
    assert f"error: {ref}:" in err and "truncated" in err
    assert not out.exists()


def test_train_refuses_a_missing_exemplar_file(run, tmp_path):
    code, err, _ = _train_bad(tmp_path, run.mics[0], tmp_path / "nowhere.star")
    assert code == 1
    assert str(tmp_path / "nowhere.star") in err


def test_bad_options_are_usage_errors(run, tmp_path):
    out = tmp_path / "model"
    code, _, err = cli(
        "train", run.mics[0], "--coords", run.exemplars, "--diameter", 20, "--out", out, "--set", "nope=1"
    )
    assert code == 2 and "nope" in err
    with pytest.raises(SystemExit) as info, redirect_stderr(io.StringIO()) as err_io:
        main(["pick", str(run.mics[1]), "--model", str(run.model), "--out", str(out), "--threshold", "high"])
    assert info.value.code == 2
    assert "expected auto, gmm, robust, otsu, knn or a number" in err_io.getvalue()


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (["--threshold", "auto"], "--clear goes back to each micrograph's own automatic cutoff"),  # not a rule
        (["--threshold", "0.4", "--clear"], "not allowed with argument"),
        ([], "one of the arguments --threshold --clear is required"),
    ],
)
def test_rethreshold_takes_a_score_or_clear(options: list[str], why: str) -> None:
    with pytest.raises(SystemExit) as info, redirect_stderr(io.StringIO()) as err_io:
        main(["session", "rethreshold", "--project", "p", "--session", "s", *options])
    assert info.value.code == 2 and why in err_io.getvalue(), err_io.getvalue()


def test_threshold_rules_come_from_one_registry() -> None:
    from typing import get_args

    from cryomae.picking.threshold import THRESHOLD_RULES

    # the config's type and the CLI's parser read the registry; the picker dispatches on every rule
    rule_type, number = get_args(PickConfig.model_fields["threshold"].annotation)
    assert get_args(rule_type) == THRESHOLD_RULES and number is float
    parser_rules = [
        r
        for r in THRESHOLD_RULES
        if build_parser().parse_args(["pick", "m.mrc", "--model", "m", "--out", "o", "--threshold", r])
    ]
    assert parser_rules == list(THRESHOLD_RULES)


# ------------------------------------------------------------------------------------------------- help

OPTIONS = {
    "train": [
        "reference",
        "--coords",
        "--diameter",
        "--out",
        "--preset",
        "--unlabeled",
        "--box-factor",
        "--epochs",
        "--pretrain-epochs",
        "--seed",
        "--device",
        "--encoder",
        "--config",
        "--set",
    ],
    "pick": [
        "MICROGRAPH",
        "--model",
        "--out",
        "--stride-fraction",
        "--threshold",
        "--score",
        "--no-nms",
        "--device",
        "--batch-size",
        "--json",
    ],
    "evaluate": ["--picks", "--truth", "--diameter", "--iou", "--json"],
    "preview": ["micrograph", "--picks", "--truth", "--out", "--diameter", "--size", "--no-legend"],
    "example": ["--out", "--preset", "--seed"],
}


def _subparsers() -> dict:
    import argparse

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", list(OPTIONS))
def test_help_of_every_sub_command_mentions_each_option(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: cryomae {command}" in text
    for option in OPTIONS[command]:
        assert option in text, f"{command} --help does not mention {option}"
    # and nothing the parser defines is missing from the list above
    for action in _subparsers()[command]._actions:
        if action.dest == "help":
            continue
        names = action.option_strings or [action.metavar or action.dest]
        assert any(n in OPTIONS[command] for n in names), f"{command}: {names} not in the test's list"


# the live services' and operator's commands (tested in tests/live)
LIVE: dict[str, list[str]] = {
    "service": [],
    "run": [],
    "demo": [],
    "project": ["create", "list"],
    "exemplars": ["add"],
    "session": ["start", "stop", "rethreshold", "repick"],
    "status": [],
    "dlq": [],
    "config": ["show"],
    "encoder": ["pretrain", "list"],
    "gallery": ["serve", "build"],
}


LIVE_ARGV = [[c, a] for c, subs in LIVE.items() for a in subs] + [[c] for c, subs in LIVE.items() if not subs]


@pytest.mark.parametrize("argv", LIVE_ARGV)
def test_help_of_every_live_command(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    assert f"usage: cryomae {' '.join(argv)}" in capsys.readouterr().out


def test_top_level_help_lists_every_sub_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert set(_subparsers()) == set(OPTIONS) | set(LIVE)
    for command in [*OPTIONS, *LIVE]:
        assert command in text
    assert "--log-level" in text and "--log-json" in text


def test_sigusr1_writes_every_threads_stack_and_the_command_goes_on(tmp_path: Path) -> None:
    # an operator's first look at a process that seems stuck: `kill -USR1 PID` prints where each thread waits
    import signal
    import subprocess
    import sys

    code = (
        "import sys, threading, time\n"
        "from cryomae.operator import cli\n"
        "def stuck(args):\n"
        "    print('waiting', flush=True)\n"
        "    threading.Event().wait(60)\n"
        "    return 0\n"
        "cli.cmd_project_list = stuck\n"
        "sys.exit(cli.main(['project', 'list']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "waiting"
        proc.send_signal(signal.SIGUSR1)
        assert proc.stderr is not None
        dump = [proc.stderr.readline() for _ in range(4)]
        assert any("Thread" in line or "Current thread" in line for line in dump), dump
        assert proc.poll() is None, "the dump does not stop the command"
    finally:
        proc.kill()
        proc.communicate()
