"""What the operator commands print for people: a count with its noun ("1 version", never "1 versions"), each
session's cutoff in `cryomae status`, and, off a terminal, the command's result with no log line mixed into it
(JSON log lines only when asked for)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cryomae.store.outputs import SessionOutputs
from cryomae.words import plural
from tests.e2e.test_cli import cli
from tests.store.test_outputs import MIC_A, picks

_SCRIPT = Path(sys.executable).with_name("cryomae")
CRYOMAE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "cryomae.operator.cli"]


def test_a_count_takes_the_singular_only_for_one() -> None:
    assert plural(1, "version") == "1 version"
    assert plural(0, "version") == "0 versions"
    assert plural(2, "message") == "2 messages"
    assert plural(1, "micrograph is", "micrographs are") == "1 micrograph is"
    assert plural(3, "micrograph is", "micrographs are") == "3 micrographs are"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The settings options of a site in tmp_path, with no CRYOMAE_* variable of the caller's in the way."""
    for name in [k for k in os.environ if k.startswith("CRYOMAE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return ["--store", str(tmp_path / "store"), "--outputs", str(tmp_path / "outputs"), "--state", str(tmp_path / "st")]


def _session(outputs: Path, session: str) -> SessionOutputs:
    out = SessionOutputs(outputs / "proj" / session)
    out.apply(picks(MIC_A, [0.9, 0.2, 0.6], session=session))  # the picker's own cutoff 0.5: 2 particles
    return out


def _cutoffs(stdout: str) -> dict[str, str]:
    """The last column of `cryomae status`'s session table (cutoff), by project/session."""
    rows = [line.split() for line in stdout.splitlines() if line.startswith("proj/")]
    return {row[0]: row[-1] for row in rows}


def test_status_shows_each_sessions_cutoff_after_a_rethreshold(site: list[str], tmp_path: Path) -> None:
    _session(tmp_path / "outputs", "s1")
    moved = _session(tmp_path / "outputs", "s2")
    moved.set_threshold(0.15)  # what `cryomae session rethreshold --threshold 0.15` has the writer do
    code, out, err = cli("status", *site)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("project/session"))
    assert header.split()[-1] == "cutoff"
    assert _cutoffs(out) == {"proj/s1": "automatic", "proj/s2": "0.15"}
    code, out, err = cli("status", "--json", *site)
    assert [s["threshold"] for s in json.loads(out)["sessions"]] == [None, 0.15]
    moved.set_threshold(None)  # `--clear`: each micrograph's automatic cutoff again
    assert _cutoffs(cli("status", *site)[1]) == {"proj/s1": "automatic", "proj/s2": "automatic"}


def test_a_command_says_1_micrograph_not_1_micrographs(site: list[str], tmp_path: Path) -> None:
    _session(tmp_path / "outputs", "s1")
    code, out, err = cli("gallery", "build", "--project", "proj", "--session", "s1", *site)
    assert code == 0, err
    assert out.startswith("1 micrograph drawn; open "), out  # the micrograph itself is gone: listed, no picture


def _command(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``cryomae ARGS`` as a script runs it: stdout and stderr pipes (not a terminal), the site's settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CRYOMAE_")}
    base.update(
        CRYOMAE_STORE=str(tmp_path / "store"), CRYOMAE_OUTPUTS=str(tmp_path / "outputs"), CRYOMAE_STATE=str(tmp_path)
    )
    return subprocess.run(
        [*CRYOMAE, *args],
        env={**base, **(env or {})},
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_off_a_terminal_a_command_prints_its_result_and_no_log_line(tmp_path: Path) -> None:
    created = _command(tmp_path, "project", "create", "betagal", "--diameter", "108")
    assert created.returncode == 0, created.stderr
    assert created.stdout == f"project betagal at {tmp_path / 'store' / 'projects' / 'betagal'}\n"
    assert created.stderr == "", "no log line beside the result (the store logs project_created at INFO)"
    status = _command(tmp_path, "status", "--json")
    assert status.returncode == 0 and status.stderr == "", status.stderr
    assert [p["project"] for p in json.loads(status.stdout)["projects"]] == ["betagal"]  # one JSON document


def test_log_lines_of_a_command_are_text_unless_json_is_asked_for(tmp_path: Path) -> None:
    text = _command(tmp_path, "--log-level", "info", "project", "create", "apo")
    assert text.returncode == 0 and text.stdout.startswith("project apo at "), text.stderr
    (line,) = text.stderr.splitlines()
    assert "project_created" in line and not line.lstrip().startswith("{"), line
    asked = _command(tmp_path, "--log-level", "info", "project", "create", "holo", env={"CRYOMAE_LOG_JSON": "true"})
    assert asked.returncode == 0 and asked.stdout.startswith("project holo at "), asked.stderr
    (record,) = [json.loads(line) for line in asked.stderr.splitlines()]
    assert record["event"] == "project_created" and record["project"] == "holo"
