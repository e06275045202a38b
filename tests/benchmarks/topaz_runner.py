"""Run the Topaz particle picker (``topaz-em`` 0.3.20) as a baseline for the side-by-side benchmark.

Topaz is not a dependency of the project: :func:`ensure_topaz` installs it, on first use, into its own virtual
environment under the benchmark cache folder (``$CRYOMAE_BENCH_CACHE``, else ``~/.cache/cryomae-bench``), and every
Topaz step runs as a subprocess of that environment's ``topaz`` executable, on the CPU (``-d -1``), with 2 threads.

Pipeline, for both models:

1. Every micrograph is read with ``cryomae.io.read_micrograph`` and written as a float32 MRC copy into the work
   folder, so Topaz only ever reads MRC (I/O conversion: reported in ``details`` but not timed as picking).
2. ``topaz preprocess -s F`` bins by the integer factor F of :func:`downsample_factor` (Fourier cropping, so
   binned pixel ``i`` sits at original pixel ``i * F``) and normalises (Topaz's default GMM normalisation).
3. ``topaz extract -r R -t -6 -x F``: scores every pixel with the model and extracts peaks by non-maximum
   suppression with radius ``R = floor(0.5 * diameter / F + 0.5)`` (about the particle radius in binned pixels),
   down to Topaz's default extraction floor (score > -6), up-scaling the coordinates by F to original pixels.

Preprocess + extract of the queries is the timed picking (``seconds_per_micrograph``).

The decision threshold (``TopazResult.threshold``) is 0 for both models. Topaz's scores are the per-pixel logits
of its classifier, i.e. log-likelihood ratios log(p / (1 - p)) (``topaz extract --help``: "-6 is p>=0.0025"),
so 0 is p = 0.5, the classifier's own decision boundary. Topaz documents no other default picking threshold:
``-t -6`` is only an extraction floor (its tutorials pick a cutoff per dataset from the precision-recall curve,
which needs labels the few-shot protocol does not have), so 0 is the threshold an operator gets without tuning.

This file is not collected by pytest (it is not named ``test_*.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TOPAZ_VERSION = "0.3.20"
TORCH_PIN = "torch==2.14.1"  # pip takes these from the machine's local disk; other specs download GBs
TORCHVISION_PIN = "torchvision==0.29.1"
PYTHON = "python3.11"
TARGET_DIAMETER_PX = 24.0  # binning target for the particle diameter (see downsample_factor)
EXTRACTION_FLOOR = -6.0  # Topaz's default ``extract -t``: keeps scores > -6 (p > 0.0025)
DECISION_THRESHOLD = 0.0  # logit 0 = p 0.5, see the module docstring
THREADS = 2
DEFAULT_TRAIN_EPOCHS = 3  # Topaz's default is 10 epochs of 1000 updates: hours on 2 CPU cores (see topaz_trained)
TRAIN_EPOCH_SIZE = 100
TRAIN_RADIUS = 3  # Topaz's default ``topaz train -r``
EXPECTED_PARTICLE_AREA_FRACTION = 0.25  # expected particles = 0.25 * H * W / diameter**2, see topaz_trained
_MARKER = "installed.json"
_TAIL_LINES = 15
_IMPORT_CHECK = (
    "import json, topaz, torch, torchvision; print(json.dumps({'topaz': topaz.__version__, "
    "'torch': torch.__version__, 'torchvision': torchvision.__version__}))"
)

Log = Callable[[str], None]
Picks = dict[str, tuple[np.ndarray, np.ndarray]]


class TopazError(Exception):
    """Topaz could not be installed or one of its commands failed."""


@dataclass
class TopazResult:
    """Topaz's picks on the queries and how they were made.

    ``picks``: micrograph stem -> (xy [N, 2] float64 in original micrograph pixels, x = column, y = row, 0-based;
    scores [N] float64), every extracted pick down to Topaz's extraction floor, sorted by descending score.
    ``seconds_per_micrograph``: wall time of ``topaz preprocess`` + ``topaz extract`` on the queries divided by
    their number (no training, no MRC conversion). ``train_seconds``: None for the pretrained model.
    ``downsample``: the binning factor. ``radius``: the extraction radius in binned pixels. ``threshold``: Topaz's
    own decision threshold on its scores (0, see the module docstring). ``details``: commands, versions, settings.
    """

    picks: Picks
    seconds_per_micrograph: float
    train_seconds: float | None
    downsample: int
    radius: int
    threshold: float
    details: dict[str, Any] = field(default_factory=dict)


def result_to_json(result: TopazResult) -> dict[str, Any]:
    """A TopazResult as plain JSON (picks as lists), for the benchmark's result cache."""
    return {
        "picks": {stem: {"xy": xy.tolist(), "scores": sc.tolist()} for stem, (xy, sc) in result.picks.items()},
        "seconds_per_micrograph": result.seconds_per_micrograph,
        "train_seconds": result.train_seconds,
        "downsample": result.downsample,
        "radius": result.radius,
        "threshold": result.threshold,
        "details": result.details,
    }


def result_from_json(data: dict[str, Any]) -> TopazResult:
    """The inverse of :func:`result_to_json`; raises KeyError/ValueError/TypeError on a malformed record."""
    picks: Picks = {
        stem: (
            np.asarray(p["xy"], dtype=np.float64).reshape(-1, 2),
            np.asarray(p["scores"], dtype=np.float64).reshape(-1),
        )
        for stem, p in data["picks"].items()
    }
    for stem, (xy, sc) in picks.items():
        if len(xy) != len(sc):
            raise ValueError(f"cached picks of {stem}: {len(xy)} positions but {len(sc)} scores")
    train = data["train_seconds"]
    return TopazResult(
        picks,
        float(data["seconds_per_micrograph"]),
        None if train is None else float(train),
        int(data["downsample"]),
        int(data["radius"]),
        float(data["threshold"]),
        dict(data["details"]),
    )


def cache_dir() -> Path:
    """The benchmark cache folder: ``$CRYOMAE_BENCH_CACHE`` if set, else ``~/.cache/cryomae-bench``."""
    env = os.environ.get("CRYOMAE_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cryomae-bench"


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(THREADS)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the benchmark pins Topaz to the CPU (-d -1) anyway
    env.pop("PYTHONPATH", None)
    return env


def _run(cmd: Sequence[str | Path], log: Log, *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; raise TopazError naming it, with its last stderr lines, on failure."""
    argv = [str(c) for c in cmd]
    log(f"$ {shlex.join(argv)}")
    try:
        proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, check=False)
    except OSError as exc:
        raise TopazError(f"cannot run {shlex.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        tail = _tail(proc.stderr) or _tail(proc.stdout)
        raise TopazError(f"command failed (exit {proc.returncode}): {shlex.join(argv)}: {tail}")
    return proc


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (two benchmark runs must not build the same venv at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_topaz(cache: Path | None = None, log: Log = print) -> Path:
    """Install Topaz into ``<cache>/topaz-0.3.20/venv`` unless already done; return its ``topaz`` executable.

    A marker file written after a successful install and import check means "installed"; a venv without it is
    a half-finished install and is removed and rebuilt.
    """
    root = (cache if cache is not None else cache_dir()) / f"topaz-{TOPAZ_VERSION}"
    venv = root / "venv"
    exe = venv / "bin" / "topaz"
    marker = root / _MARKER
    with _locked(root / ".lock"):
        if marker.is_file() and exe.is_file():
            return exe
        python = shutil.which(PYTHON)
        if python is None:
            raise TopazError(f"{PYTHON} not found on PATH: it is needed to create Topaz's virtual environment")
        marker.unlink(missing_ok=True)
        if venv.exists():
            log(f"removing the unfinished Topaz environment {venv}")
            shutil.rmtree(venv)
        log(f"installing Topaz {TOPAZ_VERSION} into {venv} (once; takes minutes)")
        t0 = time.perf_counter()
        _run([python, "-m", "venv", venv], log)
        vpy = venv / "bin" / "python"
        _run([vpy, "-m", "pip", "install", "-q", f"topaz-em=={TOPAZ_VERSION}", TORCH_PIN, TORCHVISION_PIN], log)
        check = _run([vpy, "-c", _IMPORT_CHECK], log)
        if not exe.is_file():
            raise TopazError(f"Topaz installed but {exe} is missing")
        try:
            versions = json.loads(check.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise TopazError(f"unexpected output of the Topaz import check: {_tail(check.stdout)}") from exc
        if versions.get("topaz") != TOPAZ_VERSION:
            raise TopazError(f"expected Topaz {TOPAZ_VERSION}, the environment has {versions.get('topaz')}")
        info = {**versions, "python": python, "install_seconds": round(time.perf_counter() - t0, 1)}
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(marker)
        log(f"Topaz {TOPAZ_VERSION} installed in {info['install_seconds']:.0f} s")
        return exe


def _installed_versions(exe: Path) -> dict[str, Any]:
    marker = exe.parent.parent.parent / _MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {"topaz": TOPAZ_VERSION}
    return {k: data[k] for k in ("topaz", "torch", "torchvision") if k in data}


def downsample_factor(diameter: float) -> int:
    """The integer binning factor that brings ``diameter`` closest to 24 px (ties: the smaller factor), >= 1."""
    if not math.isfinite(diameter) or diameter <= 0:
        raise ValueError(f"particle diameter must be positive, got {diameter}")
    upper = max(1, math.ceil(diameter / TARGET_DIAMETER_PX))
    candidates = {max(1, upper - 1), upper}
    return min(candidates, key=lambda f: (abs(diameter / f - TARGET_DIAMETER_PX), f))


def _radius(diameter: float, factor: int) -> int:
    """Extraction radius in binned pixels: half the diameter, rounded half up, at least 1."""
    return max(1, math.floor(0.5 * diameter / factor + 0.5))


def read_topaz_coordinates(path: Path, factor: int = 1) -> Picks:
    """Parse a ``topaz extract`` table (tab-separated: image_name, x_coord, y_coord, score).

    Coordinates are multiplied by ``factor`` (pass the binning factor when the file is in binned pixels). Returns
    stem -> (xy [N, 2] float64, x = column; scores [N] float64), each sorted by descending score (stable).
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise TopazError(f"{path}: empty file, expected a header image_name, x_coord, y_coord, score")
    header = lines[0].split("\t")
    try:
        i_name, i_x, i_y, i_score = (header.index(c) for c in ("image_name", "x_coord", "y_coord", "score"))
    except ValueError as exc:
        raise TopazError(f"{path}: header {header} lacks image_name, x_coord, y_coord or score") from exc
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for n, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        try:
            x, y, s = float(cells[i_x]), float(cells[i_y]), float(cells[i_score])
            name = cells[i_name]
        except (IndexError, ValueError) as exc:
            raise TopazError(f"{path}:{n}: cannot parse {line!r}") from exc
        rows.setdefault(name, []).append((x, y, s))
    picks: Picks = {}
    for name, values in rows.items():
        arr = np.asarray(values, dtype=np.float64)
        order = np.argsort(-arr[:, 2], kind="stable")
        picks[name] = (arr[order, :2] * factor, arr[order, 2].copy())
    return picks


def _mrc_copies(paths: Sequence[Path], dest: Path) -> tuple[dict[str, Path], tuple[int, int], float]:
    """Write float32 MRC copies of the micrographs; return stem -> copy, the first shape and the seconds taken."""
    from cryomae.io import read_micrograph
    from cryomae.io.micrographs import write_mrc

    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out: dict[str, Path] = {}
    shape: tuple[int, int] | None = None
    for p in paths:
        p = Path(p)
        if p.stem in out:
            raise TopazError(f"two micrographs share the stem {p.stem!r}: Topaz names images by stem")
        if any(c.isspace() for c in p.stem):
            raise TopazError(f"micrograph stem {p.stem!r} contains whitespace, which Topaz's tables cannot hold")
        mic = read_micrograph(p)
        shape = shape or mic.shape
        target = dest / f"{p.stem}.mrc"
        write_mrc(target, np.asarray(mic.data, dtype=np.float32), dtype=np.float32)
        out[p.stem] = target
    if shape is None:
        raise TopazError("no micrographs given")
    return out, shape, time.perf_counter() - t0


def _preprocess(exe: Path, mrcs: Sequence[Path], factor: int, dest: Path, log: Log) -> list[str]:
    cmd = [str(exe), "preprocess", "-s", str(factor), "-d", "-1", "-t", "0", "-j", str(THREADS), "-o", str(dest)]
    _run([*cmd, *map(str, mrcs)], log)
    missing = [m.name for m in mrcs if not (dest / f"{m.stem}.mrc").is_file()]
    if missing:
        raise TopazError(f"topaz preprocess wrote no output for {', '.join(missing)} in {dest}")
    return [*cmd, "<mrc files>"]


def _extract(
    exe: Path, model: str | Path, images: Sequence[Path], factor: int, radius: int, out: Path, log: Log
) -> list[str]:
    cmd = [
        str(exe), "extract", "-m", str(model), "-r", str(radius), "-t", str(EXTRACTION_FLOOR), "-x", str(factor),
        "-d", "-1", "--num-workers", "0", "-j", str(THREADS), "-o", str(out),
    ]  # fmt: skip
    _run([*cmd, *map(str, images)], log)
    if not out.is_file():
        raise TopazError(f"topaz extract wrote no output file {out}")
    return [*cmd, "<preprocessed mrc files>"]


def _pick(
    exe: Path, model: str | Path, queries: Sequence[Path], diameter: float, workdir: Path, log: Log
) -> tuple[Picks, float, int, int, dict[str, Any]]:
    """MRC copies, then the timed preprocess + extract; return picks, seconds per query, factor, radius, details."""
    factor = downsample_factor(diameter)
    radius = _radius(diameter, factor)
    mrcs, _, convert_s = _mrc_copies(queries, workdir / "queries_mrc")
    t0 = time.perf_counter()
    pre_cmd = _preprocess(exe, list(mrcs.values()), factor, workdir / "queries_pre", log)
    pre_s = time.perf_counter() - t0
    images = [workdir / "queries_pre" / f"{stem}.mrc" for stem in mrcs]
    out = workdir / "extracted.txt"
    ext_cmd = _extract(exe, model, images, factor, radius, out, log)
    total = time.perf_counter() - t0
    found = read_topaz_coordinates(out, factor=1)  # already up-scaled by ``-x factor``
    picks: Picks = {stem: found.get(stem, (np.zeros((0, 2)), np.zeros(0))) for stem in mrcs}
    details = {
        "preprocess_command": pre_cmd,
        "extract_command": ext_cmd,
        "mrc_conversion_seconds": round(convert_s, 3),
        "preprocess_seconds": round(pre_s, 3),
        "extract_seconds": round(total - pre_s, 3),
        "extraction_floor": EXTRACTION_FLOOR,
        "n_picks": {stem: len(s) for stem, (_, s) in picks.items()},
        "device": "cpu",
        "threads": THREADS,
    }
    return picks, total / len(mrcs), factor, radius, details


def topaz_pretrained(
    queries: Sequence[Path],
    diameter: float,
    workdir: Path,
    *,
    model: str = "resnet16_u64",
    topaz: Path | None = None,
    log: Log = print,
) -> TopazResult:
    """Pick the queries with a pretrained Topaz model (default: the general ``resnet16_u64`` shipped with Topaz)."""
    if not queries:
        raise TopazError("no query micrographs given")
    exe = topaz if topaz is not None else ensure_topaz(log=log)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    picks, per_mic, factor, radius, details = _pick(exe, model, queries, diameter, workdir, log)
    details = {"topaz_version": TOPAZ_VERSION, **_installed_versions(exe), "model": model, **details}
    return TopazResult(picks, per_mic, None, factor, radius, DECISION_THRESHOLD, details)


def expected_particles(shape: tuple[int, int], diameter: float) -> int:
    """The operator's guess of particles per micrograph for PU learning: a quarter of the area in particle boxes."""
    h, w = shape
    return max(1, round(EXPECTED_PARTICLE_AREA_FRACTION * h * w / diameter**2))


def disc_pixels(radius: int) -> int:
    """Pixels within ``radius`` of a pixel centre (Topaz's positive region around a target, ``topaz train -r``)."""
    grid = np.arange(-radius, radius + 1)
    return int(np.count_nonzero(grid[:, None] ** 2 + grid[None, :] ** 2 <= radius**2))


def topaz_pi(n_expected: int, train_radius: int, binned_shape: tuple[int, int]) -> float:
    """PU prior pi as ``topaz train -n`` means to compute it: expected positive pixels / all pixels.

    Topaz 0.3.20 computes it with ``topaz.stats.pixels_given_radius``, which for 2-D images counts the disc
    2 * radius + 1 times (it sums a 3-D mask), so ``-n`` yields a pi 7 times too large at radius 3 (and above 1,
    hence NaN losses, at radius >= 10). Passing this value with ``--pi`` avoids that bug.
    """
    h, w = binned_shape
    return n_expected * disc_pixels(train_radius) / (h * w)


def train_pi(n_expected: int, n_labelled: int, train_radius: int, binned_shape: tuple[int, int]) -> float:
    """The ``--pi`` passed to ``topaz train``: ``topaz_pi``, unless that is not above the labelled fraction Topaz
    observes. Topaz computes that fraction with the same (2r+1)-fold inflated disc and falls back to PN learning
    when pi is not above it (15 exemplars of a large particle, e.g. the spliceosome binned 3-fold); there pi is
    passed in Topaz's own units, the value its ``-n`` would set, so that GE-binomial runs as Topaz intends."""
    h, w = binned_shape
    pi = topaz_pi(n_expected, train_radius, binned_shape)
    observed = n_labelled * disc_pixels(train_radius) * (2 * train_radius + 1) / (h * w)
    return pi * (2 * train_radius + 1) if pi <= observed else pi


def _final_metrics(curve: Path) -> dict[str, str]:
    """The last training row of Topaz's train/test curve (``-o``), as column -> text."""
    try:
        lines = [line.split("\t") for line in curve.read_text().splitlines() if line.strip()]
    except OSError:
        return {}
    rows = [r for r in lines[1:] if len(r) > 2 and r[2] == "train"]
    return dict(zip(lines[0], rows[-1], strict=False)) if lines and rows else {}


def topaz_trained(
    reference: Path,
    exemplars_xy: np.ndarray,
    queries: Sequence[Path],
    diameter: float,
    workdir: Path,
    *,
    topaz: Path | None = None,
    epochs: int | None = None,
    epoch_size: int = TRAIN_EPOCH_SIZE,
    train_radius: int = TRAIN_RADIUS,
    log: Log = print,
) -> TopazResult:
    """Train Topaz (PU learning, ``topaz train``, default GE-binomial) on the exemplars of the reference, then pick.

    ``exemplars_xy`` are [N, 2] centres in original reference pixels (x = column). Training sees the reference
    micrograph only (preprocessed like the queries; no test set), with Topaz's defaults (ResNet8, 32 units,
    pretrained initialisation, GE-binomial, minibatch 256, learning rate 2e-4) except:

    - the PU prior: an operator without ground truth guesses ``n = round(0.25 * H * W / diameter**2)`` particles
      per micrograph (H, W of the original micrograph: particles cover about a quarter of the image in
      diameter-sized boxes); it is passed as ``--pi`` = n * (pixels in a disc of ``train_radius``) / binned
      pixels, the value ``-n`` is documented to set, because Topaz 0.3.20's ``-n`` inflates it (:func:`topaz_pi`);
      where that value is not above Topaz's (equally inflated) observed labelled fraction, Topaz would switch to
      PN learning, so the inflated value ``-n`` gives is passed instead.
    - ``-r train_radius`` (positive region around each target, binned pixels): Topaz's default 3, not the
      extraction radius. With the extraction radius (14 on empiar10017/bin4) Topaz 0.3.20 overestimates the
      labelled fraction 29-fold (same bug) beyond any valid pi and silently switches GE-binomial to PN learning.
    - the amount of training: the default 10 epochs of 1000 updates take about 2.5 h on a 2-core CPU for one
      1024 x 1024 micrograph (about 0.9 s per update), so this runs ``epochs`` (default
      ``DEFAULT_TRAIN_EPOCHS`` = 3) epochs of ``epoch_size`` (default 100) updates: about 5 minutes.

    The final model is the last epoch's saved file. ``train_seconds`` covers preprocessing the reference and
    ``topaz train`` (not the MRC conversion).
    """
    if not queries:
        raise TopazError("no query micrographs given")
    xy = np.asarray(exemplars_xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
        raise ValueError(f"exemplars_xy must be a non-empty [N, 2] array, got shape {xy.shape}")
    n_epochs = DEFAULT_TRAIN_EPOCHS if epochs is None else int(epochs)
    if n_epochs < 1 or epoch_size < 1 or train_radius < 0:
        raise ValueError(
            f"need epochs >= 1, epoch_size >= 1, train_radius >= 0; got {n_epochs}, {epoch_size}, {train_radius}"
        )
    exe = topaz if topaz is not None else ensure_topaz(log=log)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    factor = downsample_factor(diameter)
    radius = _radius(diameter, factor)

    ref_mrc, shape, ref_convert_s = _mrc_copies([Path(reference)], workdir / "train_mrc")
    stem = next(iter(ref_mrc))
    n_expected = expected_particles(shape, diameter)

    t0 = time.perf_counter()
    train_pre = _preprocess(exe, list(ref_mrc.values()), factor, workdir / "train_pre", log)
    from cryomae.io import read_micrograph

    binned_shape = read_micrograph(workdir / "train_pre" / f"{stem}.mrc").shape
    pi = train_pi(n_expected, len(xy), train_radius, binned_shape)
    if not 0 < pi < 1:
        raise TopazError(f"PU prior pi = {pi:.4g} is outside (0, 1) ({n_expected} particles, radius {train_radius})")
    # Topaz reads the image list with whitespace separators: relative paths (cwd = workdir) keep spaces out.
    (workdir / "train_images.txt").write_text(f"image_name\tpath\n{stem}\ttrain_pre/{stem}.mrc\n")
    binned = np.floor(xy / factor + 0.5).astype(np.int64)  # binned pixel i sits at original pixel i * factor
    rows = "".join(f"{stem}\t{x}\t{y}\n" for x, y in binned)
    (workdir / "train_targets.txt").write_text("image_name\tx_coord\ty_coord\n" + rows)
    models = workdir / "models"
    models.mkdir(exist_ok=True)
    train_cmd = [
        str(exe), "train", "--train-images", "train_images.txt", "--train-targets", "train_targets.txt",
        "--pi", f"{pi:.6g}", "-r", str(train_radius), "--num-epochs", str(n_epochs), "--epoch-size", str(epoch_size),
        "-d", "-1", "--num-workers", "0", "-j", str(THREADS), "--save-prefix", "models/model", "-o", "train_curve.txt",
    ]  # fmt: skip
    proc = _run(train_cmd, log, cwd=workdir)
    train_s = time.perf_counter() - t0
    if "setting method to PN" in proc.stderr:
        raise TopazError(f"topaz train fell back from GE-binomial to PN learning: {_tail(proc.stderr, 3)}")
    saved = {int(p.stem.rsplit("epoch", 1)[1]): p for p in models.glob("model_epoch*.sav")}
    if n_epochs not in saved:
        raise TopazError(f"topaz train saved no model for epoch {n_epochs} in {models} (saved: {sorted(saved)})")
    final = saved[n_epochs]
    metrics = _final_metrics(workdir / "train_curve.txt")
    if metrics.get("loss", "nan").lower() == "nan":
        raise TopazError(f"topaz train ended without a finite loss (last row: {metrics}); see {workdir}")
    log(f"Topaz trained in {train_s:.0f} s; model {final}")

    picks, per_mic, _, _, details = _pick(exe, final, queries, diameter, workdir, log)
    details = {
        "topaz_version": TOPAZ_VERSION,
        **_installed_versions(exe),
        "model": "topaz train (resnet8, 32 units, pretrained init, GE-binomial), last epoch",
        "train_preprocess_command": train_pre,
        "train_command": train_cmd,
        "train_mrc_conversion_seconds": round(ref_convert_s, 3),
        "num_epochs": n_epochs,
        "epoch_size": epoch_size,
        "train_radius": train_radius,
        "expected_particles_per_micrograph": n_expected,
        "pi": pi,
        "n_exemplars": len(xy),
        "training_micrograph": stem,
        "final_train_metrics": metrics,
        **details,
    }
    return TopazResult(picks, per_mic, train_s, factor, radius, DECISION_THRESHOLD, details)
