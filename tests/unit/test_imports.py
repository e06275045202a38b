"""No torch where none is needed (style habit 15): the watcher, the writer, the gallery server and every operator
command but ``train``, ``pick``, ``encoder``, ``example`` and ``demo`` run without importing torch or timm.

Each case runs the real command in a fresh interpreter (``cryomae.operator.cli.main`` with arguments that make it
do its work, against a store, state and outputs folder with a project, a model version, a session's outputs and
a micrograph) and reports what ``sys.modules`` holds once the work is done. A long-running one reports once it
has started (the services: after ``App.start``; the gallery server: after it answered a request) and is then
stopped as an operator would stop it. ``train`` is the control: its path does import torch, so the check can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cryomae.io import Coordinates, write_coordinates, write_mrc
from cryomae.io.writers import AUTOPICK_SUFFIX
from cryomae.messages import PicksReady
from cryomae.model.layout import MANIFEST, WEIGHTS, sha256_file, write_manifest
from cryomae.store.outputs import SessionOutputs
from cryomae.store.projects import ProjectStore
from cryomae.synthetic import make_micrograph

HEAVY = ("torch", "timm")
PROJECT, SESSION = "proj", "sess"
MARK = "imports:"  # the line the child prints with what it loaded
TIMEOUT_S = 300.0  # a busy machine; the cases without torch take about a second

# Reports the heavy modules loaded; the services report after ``App.start`` (every service built and started),
# then stop on SIGTERM as under a supervisor; the gallery server after it answered a page, then shuts down.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, threading, urllib.request

    HEAVY, ARGS = {heavy!r}, {args!r}

    def report(**facts):
        print({mark!r} + json.dumps(facts), flush=True)

    if ARGS[0] in ("run", "service"):
        from cryomae.service import app

        started = app.App.start

        def start(self):
            started(self)
            report(loaded=[m for m in HEAVY if m in sys.modules])
            os.kill(os.getpid(), signal.SIGTERM)

        app.App.start = start
    elif ARGS[0] == "gallery" and ARGS[1] == "serve":
        from cryomae.gallery import server

        made = server.make_server

        def make(*a, **k):
            httpd = made(*a, **k)

            def visit():  # the page listing every session, then stop as Ctrl-C would
                host, port = httpd.server_address[:2]
                try:
                    with urllib.request.urlopen(f"http://{{host}}:{{port}}/", timeout=60) as r:
                        report(served=r.status)
                finally:
                    httpd.shutdown()

            threading.Thread(target=visit, daemon=True).start()
            return httpd

        server.make_server = make

    from cryomae.operator.cli import main

    code = main(ARGS)
    report(loaded=[m for m in HEAVY if m in sys.modules])
    sys.exit(code)
    """
)


@dataclass(frozen=True)
class Site:
    """The files a command works on (by placeholder name), and the environment that names the folders."""

    files: dict[str, str]
    env: dict[str, str]

    @property
    def root(self) -> Path:
        return Path(self.files["root"])


def _publish_a_model(store: ProjectStore) -> None:
    """A published model version (placeholder weights: nothing here loads it), for ``session repick``."""
    version, folder = store.new_version_dir(PROJECT)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WEIGHTS).write_bytes(b"not read by any command here")
    write_manifest(folder / MANIFEST, {"weights": {"sha256": sha256_file(folder / WEIGHTS)}})
    store.publish_version(PROJECT, version, folder)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("imports")
    data = root / "data" / SESSION
    data.mkdir(parents=True)
    mic = make_micrograph(shape=(256, 256), diameter=24.0, n_particles=12, seed=0)
    micrograph = data / "mic_000.mrc"
    write_mrc(micrograph, mic.image, pixel_size=2.0)
    coords = root / "exemplars.star"
    write_coordinates(coords, Coordinates(mic.centres[:8]))
    picks, truth = root / "picks", root / "truth"
    picks.mkdir()
    truth.mkdir()
    scores = np.linspace(0.9, 0.5, len(mic.centres))
    write_coordinates(picks / f"mic_000{AUTOPICK_SUFFIX}", Coordinates(mic.centres, scores))
    write_coordinates(truth / "mic_000.star", Coordinates(mic.centres))

    store = ProjectStore(root / "store")
    store.create_project(PROJECT, diameter=24.0)
    _publish_a_model(store)
    SessionOutputs(root / "outputs" / PROJECT / SESSION).apply(
        PicksReady(
            project=PROJECT,
            session=SESSION,
            micrograph=str(micrograph),
            micrograph_id="m0",
            model_version="v0",
            diameter=24.0,
            threshold=0.6,
            x=mic.centres[:, 0].tolist(),
            y=mic.centres[:, 1].tolist(),
            scores=scores.tolist(),
            shape=(256, 256),
            complete_at=time.time(),
        )
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(root),
        "CRYOMAE_STORE": str(root / "store"),
        "CRYOMAE_STATE": str(root / "state"),
        "CRYOMAE_OUTPUTS": str(root / "outputs"),
        "CRYOMAE_BROKER__URL": "memory://",
        "CRYOMAE_DATA_ROOTS": json.dumps([str(root / "data")]),
        "CRYOMAE_METRICS_PORT": "0",
        "CRYOMAE_SECRETS_DIR": str(root / "no-secrets"),
        "CRYOMAE_DEVICE": "cpu",
    }
    files = {
        "root": root,
        "micrograph": micrograph,
        "session_folder": data,
        "coords": coords,
        "picks": picks,
        "pick_file": picks / f"mic_000{AUTOPICK_SUFFIX}",
        "truth": truth,
    }
    return Site({k: str(v) for k, v in files.items()}, env)


@dataclass(frozen=True)
class Run:
    code: int  # the exit code (0 after SIGTERM, for a service)
    loaded: list[str]  # the heavy modules imported once the work was done
    facts: dict[str, Any]  # what else the child reported


def _run(site: Site, args: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cryomae ARGS`` in a fresh interpreter (``{...}`` in ARGS: the site's files)."""
    args = [a.format(**site.files) for a in args]
    child = CHILD.format(heavy=HEAVY, args=args, mark=MARK)
    proc = subprocess.run(
        [sys.executable, "-c", child],
        env={**site.env, **(env or {})},
        cwd=site.root,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    facts: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            facts.update(json.loads(line[len(MARK) :]))
    assert "loaded" in facts, f"cryomae {' '.join(args)}: exit {proc.returncode}, no report\n{proc.stderr}"
    return Run(proc.returncode, facts.pop("loaded"), facts)


SESSION_ARGS = ["--project", PROJECT, "--session", SESSION]
# every command and service that must not load torch, with arguments that make it work ({...}: the site's files)
COMMANDS: dict[str, list[str]] = {
    "config show": ["config", "show"],
    "config reference": ["config", "reference"],
    "status": ["status"],
    "dlq list": ["dlq", "list"],
    "dlq replay": ["dlq", "replay"],
    "dlq purge": ["dlq", "purge", "--yes"],
    "project create": ["project", "create", "another", "--diameter", "30"],
    "project list": ["project", "list"],
    "exemplars add": ["exemplars", "add", "--project", PROJECT, "--micrograph", "{micrograph}", "--coords", "{coords}"],
    "session start": ["session", "start", *SESSION_ARGS, "--folder", "{session_folder}"],
    "session stop": ["session", "stop", *SESSION_ARGS],
    "session rethreshold": ["session", "rethreshold", *SESSION_ARGS, "--threshold", "0.7"],
    "session repick": ["session", "repick", *SESSION_ARGS],
    "gallery build": ["gallery", "build", *SESSION_ARGS],
    "gallery serve": ["gallery", "serve", "--port", "0"],
    "evaluate": ["evaluate", "--picks", "{picks}", "--truth", "{truth}", "--diameter", "24"],
    "preview": ["preview", "{micrograph}", "--picks", "{pick_file}", "--diameter", "24", "--out", "{root}/p.png"],
    # the watcher and the writer processes by the code path of `cryomae service NAME` (App, serve), with the
    # in-memory broker; over RabbitMQ below
    "run --services watcher": ["run", "--services", "watcher"],
    "run --services writer": ["run", "--services", "writer"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_the_command_never_imports_torch(site: Site, command: str) -> None:
    run = _run(site, COMMANDS[command])
    assert run.code == 0 and run.loaded == [], run
    if command == "gallery serve":
        assert run.facts["served"] == 200, run


@pytest.fixture
def rabbit_env() -> Iterator[dict[str, str]]:
    from tests.messaging.conftest import AMQP_URL, delete_namespace

    namespace = f"test-{uuid.uuid4().hex[:12]}"
    yield {"CRYOMAE_BROKER__URL": AMQP_URL, "CRYOMAE_BROKER__NAMESPACE": namespace}
    delete_namespace(namespace)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("name", ["watcher", "writer"])
def test_the_service_never_imports_torch(site: Site, rabbit_env: dict[str, str], name: str) -> None:
    run = _run(site, ["service", name], rabbit_env)
    assert run.code == 0 and run.loaded == [], run


def test_training_does_import_torch(site: Site) -> None:
    """The control: the check sees torch where it is loaded (``train`` fails on the missing file after importing
    what training needs)."""
    args = ["train", "{root}/missing.mrc", "--coords", "{coords}", "--diameter", "24", "--out", "{root}/model"]
    run = _run(site, args)
    assert run.code == 1 and "torch" in run.loaded, run
