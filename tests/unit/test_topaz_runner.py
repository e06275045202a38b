"""Fast tests of the Topaz benchmark runner's pure helpers (no Topaz install, no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.benchmarks import topaz_runner
from tests.benchmarks.topaz_runner import TopazError, cache_dir, downsample_factor, read_topaz_coordinates

HEADER = "image_name\tx_coord\ty_coord\tscore\n"


@pytest.mark.parametrize(
    ("diameter", "factor"),
    [
        (27.0, 1),  # empiar10017/bin4: 27 px beats 13.5 px
        (108.0, 5),  # empiar10017/full: 21.6 px beats 27 px
        (44.1, 2),  # sim/apoferritin: 22.05 px
        (40.0, 2),  # sim/gltph_micelle: 20 px beats 40 px
        (5.0, 1),  # never below 1
        (240.0, 10),  # exactly 24 px
        (32.0, 1),  # tie 32 px vs 16 px (both 8 away): the smaller factor
        (36.0, 2),  # 18 px beats 36 px
    ],
)
def test_downsample_factor(diameter: float, factor: int) -> None:
    assert downsample_factor(diameter) == factor


@pytest.mark.parametrize("diameter", [0.0, -3.0, float("nan")])
def test_downsample_factor_rejects_bad_diameter(diameter: float) -> None:
    with pytest.raises(ValueError, match="diameter"):
        downsample_factor(diameter)


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "extracted.txt"
    path.write_text(HEADER + body)
    return path


def test_reads_several_micrographs_sorted_by_score(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "mic_a\t10\t20\t-1.5\nmic_b\t5\t6\t0.25\nmic_a\t30\t40\t2.0\nmic_a\t50\t60\t0.5\n",
    )
    picks = read_topaz_coordinates(path)
    assert sorted(picks) == ["mic_a", "mic_b"]
    xy, scores = picks["mic_a"]
    assert xy.dtype == np.float64 and scores.dtype == np.float64
    np.testing.assert_array_equal(scores, [2.0, 0.5, -1.5])
    np.testing.assert_array_equal(xy, [[30, 40], [50, 60], [10, 20]])  # x (column) first, rows follow the scores
    xy_b, scores_b = picks["mic_b"]
    assert xy_b.shape == (1, 2)
    np.testing.assert_array_equal(xy_b, [[5, 6]])
    np.testing.assert_array_equal(scores_b, [0.25])


def test_scales_coordinates_not_scores(tmp_path: Path) -> None:
    path = _write(tmp_path, "m\t3\t7\t1.25\nm\t11\t0\t-4\n")
    xy, scores = read_topaz_coordinates(path, factor=4)["m"]
    np.testing.assert_array_equal(xy, [[12, 28], [44, 0]])
    np.testing.assert_array_equal(scores, [1.25, -4.0])


def test_header_only_means_no_picks(tmp_path: Path) -> None:
    assert read_topaz_coordinates(_write(tmp_path, "")) == {}


def test_column_order_follows_the_header(tmp_path: Path) -> None:
    path = tmp_path / "reordered.txt"
    path.write_text("score\ty_coord\tx_coord\timage_name\n0.5\t9\t2\tm\n")
    xy, scores = read_topaz_coordinates(path)["m"]
    np.testing.assert_array_equal(xy, [[2, 9]])
    np.testing.assert_array_equal(scores, [0.5])


@pytest.mark.parametrize("text", ["", "a\tb\tc\n", HEADER + "m\t1\tnot-a-number\t0.1\n", HEADER + "m\t1\n"])
def test_malformed_files_raise(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(TopazError, match=r"bad\.txt"):
        read_topaz_coordinates(path)


def test_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRYOMAE_BENCH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CRYOMAE_BENCH_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "cryomae-bench"


def test_failed_command_names_it_and_its_stderr() -> None:
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('first\\nboom\\n'); sys.exit(3)"]
    with pytest.raises(TopazError, match=r"exit 3.*boom") as info:
        topaz_runner._run(cmd, log=lambda _: None)
    assert "sys.exit(3)" in str(info.value)


class _FakeInstaller:
    """Stands in for the subprocesses of ensure_topaz: makes the files a real install would make."""

    def __init__(self, fail_pip: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail_pip = fail_pip

    def __call__(
        self, cmd: Sequence[object], log: object, *, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(c) for c in cmd]
        self.calls.append(argv)
        if argv[1:3] == ["-m", "venv"]:
            (Path(argv[3]) / "bin").mkdir(parents=True)
            (Path(argv[3]) / "bin" / "python").touch()
        elif "pip" in argv:
            if self.fail_pip:
                raise TopazError("command failed (exit 1): pip install: no matching distribution")
            (Path(argv[0]).parent / "topaz").touch()
        out = json.dumps({"topaz": topaz_runner.TOPAZ_VERSION, "torch": "2.14.1", "torchvision": "0.29.1"})
        return subprocess.CompletedProcess(argv, 0, stdout=out + "\n", stderr="")


def test_ensure_topaz_rebuilds_an_unfinished_venv_and_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / f"topaz-{topaz_runner.TOPAZ_VERSION}" / "venv" / "leftover.txt"
    stale.parent.mkdir(parents=True)
    stale.touch()
    fake = _FakeInstaller()
    monkeypatch.setattr(topaz_runner, "_run", fake)
    exe = topaz_runner.ensure_topaz(tmp_path, log=lambda _: None)
    assert exe == tmp_path / f"topaz-{topaz_runner.TOPAZ_VERSION}" / "venv" / "bin" / "topaz"
    assert exe.is_file() and not stale.exists()
    pip = next(c for c in fake.calls if "pip" in c)
    assert pip[-3:] == [f"topaz-em=={topaz_runner.TOPAZ_VERSION}", "torch==2.14.1", "torchvision==0.29.1"]
    assert any("import json, topaz, torch, torchvision" in " ".join(c) for c in fake.calls)
    n_calls = len(fake.calls)
    assert topaz_runner.ensure_topaz(tmp_path, log=lambda _: None) == exe
    assert len(fake.calls) == n_calls  # the marker says "installed": nothing runs again


def test_ensure_topaz_failure_leaves_no_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topaz_runner, "_run", _FakeInstaller(fail_pip=True))
    with pytest.raises(TopazError, match="no matching distribution"):
        topaz_runner.ensure_topaz(tmp_path, log=lambda _: None)
    assert not (tmp_path / f"topaz-{topaz_runner.TOPAZ_VERSION}" / "installed.json").exists()
    fake = _FakeInstaller()
    monkeypatch.setattr(topaz_runner, "_run", fake)
    topaz_runner.ensure_topaz(tmp_path, log=lambda _: None)  # the next call starts again from a fresh venv
    assert fake.calls[0][1:3] == ["-m", "venv"]


def test_topaz_pi_counts_the_disc_once() -> None:
    assert topaz_runner.disc_pixels(0) == 1
    assert topaz_runner.disc_pixels(1) == 5
    assert topaz_runner.disc_pixels(3) == 29
    assert topaz_runner.topaz_pi(360, 3, (1024, 1024)) == pytest.approx(360 * 29 / 1024**2)


def test_expected_particles_is_a_quarter_of_the_area_in_particle_boxes() -> None:
    assert topaz_runner.expected_particles((1024, 1024), 27.0) == 360
    assert topaz_runner.expected_particles((100, 100), 1000.0) == 1


def _result(n: int = 3) -> topaz_runner.TopazResult:
    rng = np.random.default_rng(1)
    picks = {
        "mic_a": (rng.uniform(0, 100, (n, 2)), np.sort(rng.normal(size=n))[::-1].copy()),
        "mic_b": (
            np.zeros((0, 2)),
            np.zeros(0),
        ),
    }
    return topaz_runner.TopazResult(picks, 12.5, None, 2, 10, 0.0, {"model": "resnet16_u64"})


def test_result_json_round_trip_keeps_every_pick() -> None:
    before = _result()
    after = topaz_runner.result_from_json(json.loads(json.dumps(topaz_runner.result_to_json(before))))
    assert sorted(after.picks) == ["mic_a", "mic_b"]
    for stem, (xy, sc) in before.picks.items():
        np.testing.assert_array_equal(after.picks[stem][0], xy)
        np.testing.assert_array_equal(after.picks[stem][1], sc)
        assert after.picks[stem][0].shape == (len(sc), 2)
    assert (after.seconds_per_micrograph, after.train_seconds, after.downsample, after.radius, after.threshold) == (
        12.5,
        None,
        2,
        10,
        0.0,
    )
    assert after.details == {"model": "resnet16_u64"}


def test_result_json_rejects_mismatched_picks() -> None:
    record = topaz_runner.result_to_json(_result())
    record["picks"]["mic_a"]["scores"] = record["picks"]["mic_a"]["scores"][:-1]
    with pytest.raises(ValueError, match="mic_a"):
        topaz_runner.result_from_json(record)


def test_compare_reuses_an_identical_topaz_run_and_reruns_when_inputs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.benchmarks import compare
    from tests.benchmarks.accuracy import Split

    monkeypatch.setenv("CRYOMAE_BENCH_CACHE", str(tmp_path / "cache"))
    queries = [tmp_path / "mic_a.mrc", tmp_path / "mic_b.mrc"]
    for i, q in enumerate(queries):
        q.write_bytes(bytes([i]) * 64)
    split = Split(40.0, "test", tmp_path / "ref.mrc", [0], np.zeros((1, 2)), queries, 2, {})
    calls: list[int] = []

    def fake_pretrained(qs: Sequence[Path], diameter: float, work: Path, **_: object) -> topaz_runner.TopazResult:
        calls.append(len(qs))
        return _result(len(calls) + 2)

    monkeypatch.setattr(topaz_runner, "topaz_pretrained", fake_pretrained)
    monkeypatch.setattr(topaz_runner, "ensure_topaz", lambda **_: Path("/nonexistent/topaz"))
    work = tmp_path / "work"
    work.mkdir()
    first = compare.run_topaz(compare.TOPAZ_PRETRAINED, split, work, reuse=True)
    again = compare.run_topaz(compare.TOPAZ_PRETRAINED, split, work, reuse=True)
    assert calls == [2]  # the second call reused the first's result
    assert "reused_from" not in first.details and "reused_from" in again.details
    np.testing.assert_array_equal(again.picks["mic_a"][1], first.picks["mic_a"][1])

    compare.run_topaz(compare.TOPAZ_PRETRAINED, split, work, reuse=False)
    assert calls == [2, 2]  # --rerun-topaz
    queries[1].write_bytes(b"changed" * 8)
    changed = compare.run_topaz(compare.TOPAZ_PRETRAINED, split, work, reuse=True)
    assert calls == [2, 2, 2] and "reused_from" not in changed.details  # new input contents, new key


def test_the_prior_stays_above_the_labelled_fraction_topaz_observes() -> None:
    """Topaz falls back to PN learning when pi <= its observed labelled fraction, which it inflates (2r+1)-fold:
    the spliceosome (58 px, binned 3-fold to 341 px, 15 exemplars, 78 expected particles) would; bin4 would not."""
    pi = topaz_runner.train_pi(78, 15, 3, (341, 341))
    observed = 15 * 29 * 7 / 341**2
    assert topaz_runner.topaz_pi(78, 3, (341, 341)) <= observed < pi == pytest.approx(78 * 29 * 7 / 341**2)
    assert topaz_runner.train_pi(360, 15, 3, (1024, 1024)) == topaz_runner.topaz_pi(360, 3, (1024, 1024))
