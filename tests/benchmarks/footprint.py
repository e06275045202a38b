"""What each process costs to start and to keep: CPU seconds of the operator's commands, resident memory of
each service once it is ready.

    .venv/bin/python tests/benchmarks/footprint.py                       # about 3 minutes on 2 cores
    .venv/bin/python tests/benchmarks/footprint.py --runs 3 --json /tmp/footprint.json

Operator commands (``cryomae status``, ``config show``, ``dlq list``) run ``--runs`` times each against an empty
store, state and outputs folder with the in-memory broker; their cost is the child's user + system CPU seconds
(``os.wait4``), interpreter start-up included. Services (``cryomae service watcher|writer|picker|trainer`` over
RabbitMQ, ``cryomae run`` with the in-memory broker, ``cryomae gallery serve``) start ``--service-runs`` times
each, idle; once one answers ready (``/readyz`` 200, the gallery's ``/healthz``) and has stayed idle for
``--idle`` seconds, its VmRSS and VmHWM are read from ``/proc/PID/status``, then it is stopped with SIGTERM.
The writer's heaviest work, drawing a micrograph's gallery pictures, is measured apart: the peak resident memory
(``ru_maxrss``) of ``cryomae gallery build`` (the same drawing code) over a session of one float32 micrograph,
``--draw-side`` pixels square. RabbitMQ: the test suite's (``CRYOMAE_TEST_AMQP_URL``, default the local one), in a
namespace of its own that is deleted afterwards. Writes ``--json`` (default docs/footprint.json) and prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.messaging``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.messaging.conftest import AMQP_URL, delete_namespace

CRYOMAE = str(Path(sys.executable).parent / "cryomae")  # the console script operators run
COMMANDS: dict[str, list[str]] = {
    "cryomae status": ["status"],
    "cryomae config show": ["config", "show"],
    "cryomae dlq list": ["dlq", "list"],
}
SERVICES: dict[str, list[str]] = {
    "cryomae service watcher": ["service", "watcher"],
    "cryomae service writer": ["service", "writer"],
    "cryomae gallery serve": ["gallery", "serve", "--port", "0"],
    "cryomae service picker": ["service", "picker"],
    "cryomae service trainer": ["service", "trainer"],
    "cryomae run": ["run"],
}
START_TIMEOUT_S = 300.0
DRAW = "cryomae gallery build"


def _env(folder: Path, broker: str, namespace: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYOMAE_")}
    env.update(
        CRYOMAE_STORE=str(folder / "store"),
        CRYOMAE_STATE=str(folder / "state"),
        CRYOMAE_OUTPUTS=str(folder / "outputs"),
        CRYOMAE_BROKER__URL=broker,
        CRYOMAE_BROKER__NAMESPACE=namespace,
        CRYOMAE_METRICS_PORT="0",
        CRYOMAE_DEVICE="cpu",
        CRYOMAE_LOG_JSON="true",
        CRYOMAE_SECRETS_DIR=str(folder / "no-secrets"),
    )
    return env


def _reap(proc: subprocess.Popen[str]) -> tuple[int, float, int]:
    """Wait for ``proc``: its exit code, user + system CPU seconds and peak resident memory (bytes)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def run_measured(args: Sequence[str], env: dict[str, str]) -> tuple[float, int]:
    """Run ``cryomae ARGS`` to its end (it must succeed): its CPU seconds and peak resident memory (bytes)."""
    proc = subprocess.Popen(
        [CRYOMAE, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=env["CRYOMAE_STATE"],
    )
    assert proc.stderr is not None
    err = proc.stderr.read()
    code, cpu, maxrss = _reap(proc)
    if code != 0:
        raise RuntimeError(f"cryomae {' '.join(args)} exited {code}: {err[-2000:]}")
    return cpu, maxrss


def command_cpu(args: Sequence[str], env: dict[str, str]) -> float:
    """CPU seconds of one run of ``cryomae ARGS`` (it must succeed)."""
    return run_measured(args, env)[0]


def _lines(stream: IO[str], out: queue.Queue[str], keep: list[str]) -> None:
    for line in stream:
        keep.append(line)
        out.put(line)


def _wait_line(lines: queue.Queue[str], match: Callable[[str], str | None], proc: subprocess.Popen[str]) -> str:
    """The first value ``match`` finds in the process's output lines (waiting up to START_TIMEOUT_S)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode} before it was ready") from None
            continue
        found = match(line)
        if found is not None:
            return found
    raise RuntimeError(f"not ready after {START_TIMEOUT_S:.0f} s")


def _listening_port(line: str) -> str | None:
    """The metrics port from the services' ``http_listening`` log line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and record.get("event") == "http_listening":
        return str(record["port"])
    return None


def _gallery_url(line: str) -> str | None:
    m = re.search(r"read-only on (http://\S+?)/ ", line)
    return m.group(1) if m else None


def _wait_ok(url: str, proc: subprocess.Popen[str]) -> None:
    """Poll ``url`` until it answers 200 (a readiness probe, as Kubernetes would)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)  # the probe's period
    raise RuntimeError(f"{url} not 200 after {START_TIMEOUT_S:.0f} s")


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _cpu_now(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_footprint(args: Sequence[str], env: dict[str, str], idle_s: float) -> dict[str, float]:
    """Start ``cryomae ARGS``, wait until it is ready and idle for ``idle_s``, read its memory, stop it."""
    proc = subprocess.Popen(
        [CRYOMAE, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=env["CRYOMAE_STATE"],
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    keep: list[str] = []
    reader = threading.Thread(target=_lines, args=(proc.stdout, lines, keep), daemon=True)
    reader.start()
    t0 = time.monotonic()
    try:
        if args[0] == "gallery":
            url = _wait_line(lines, _gallery_url, proc) + "/healthz"
        else:
            url = f"http://127.0.0.1:{_wait_line(lines, _listening_port, proc)}/readyz"
        _wait_ok(url, proc)
        ready_s = time.monotonic() - t0
        cpu_ready = _cpu_now(proc.pid)
        time.sleep(idle_s)  # the idle period measured, not synchronisation
        memory = _proc_status(proc.pid)
    except BaseException as exc:
        proc.kill()
        _reap(proc)
        raise RuntimeError(f"cryomae {' '.join(args)}: {exc}\n{''.join(keep[-30:])}") from exc
    proc.send_signal(signal.SIGTERM)
    code, _, maxrss = _reap(proc)
    reader.join(30)
    if code not in (0, -signal.SIGTERM):  # the gallery server leaves by the signal's default action
        raise RuntimeError(f"cryomae {' '.join(args)} exited {code} after SIGTERM\n{''.join(keep[-30:])}")
    return {
        "rss": memory["VmRSS"],
        "hwm": memory["VmHWM"],
        "maxrss": maxrss,
        "cpu_ready_s": cpu_ready,
        "ready_s": ready_s,
    }


def drawing_peak(folder: Path, env: dict[str, str], side: int, runs: int) -> dict[str, Any]:
    """Peak resident memory and CPU seconds of drawing one ``side`` x ``side`` float32 micrograph's pictures."""
    import numpy as np

    from cryomae.io import write_mrc
    from cryomae.messages import PicksReady
    from cryomae.store.outputs import SessionOutputs

    data = folder / "data"
    data.mkdir(exist_ok=True)
    path = data / f"micrograph_{side}.mrc"
    rng = np.random.default_rng(0)
    write_mrc(path, rng.standard_normal((side, side), dtype=np.float32), dtype=np.float32)
    xy = rng.uniform(0, side - 1, size=(1500, 2))
    picks = PicksReady(
        project="footprint",
        session="draw",
        micrograph=str(path),
        micrograph_id="m0",
        model_version="v0",
        diameter=side / 64,
        threshold=0.5,
        x=xy[:, 0].tolist(),
        y=xy[:, 1].tolist(),
        scores=rng.uniform(0, 1, len(xy)).tolist(),
        shape=(side, side),
        complete_at=time.time(),
    )
    SessionOutputs(Path(env["CRYOMAE_OUTPUTS"]) / picks.project / picks.session).apply(picks)
    peaks, cpus = [], []
    for _ in range(runs):
        cpu, maxrss = run_measured(
            ["gallery", "build", "--project", picks.project, "--session", picks.session],
            {**env, "CRYOMAE_DATA_ROOTS": json.dumps([str(data)])},
        )
        peaks.append(maxrss)
        cpus.append(cpu)
    path.unlink()
    return {"side": side, "maxrss": _summary(peaks), "cpu_s": _summary(cpus)}


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def report(result: dict[str, Any]) -> str:
    lines: list[str] = []
    if result["commands"]:
        lines += [
            f"Operator commands, CPU seconds (user + system) of the whole process, {result['runs']} runs:",
            "",
            "| command | median s | min s | max s |",
            "|---|---|---|---|",
        ]
    for name, row in result["commands"].items():
        s = row["cpu_s"]
        lines.append(f"| `{name}` | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} |")
    if result["services"]:
        lines += [
            "",
            f"Services, idle {result['idle_s']:.0f} s after ready, {result['service_runs']} runs (median; min-max):",
            "",
            "| service | resident MiB (VmRSS) | peak MiB (VmHWM) | CPU s to ready |",
            "|---|---|---|---|",
        ]
    for name, row in result["services"].items():
        rss, hwm, cpu = row["rss"], row["hwm"], row["cpu_ready_s"]
        lines.append(
            f"| `{name}` | {_mib(rss['median'])} ({_mib(rss['min'])}-{_mib(rss['max'])}) "
            f"| {_mib(hwm['median'])} ({_mib(hwm['min'])}-{_mib(hwm['max'])}) "
            f"| {cpu['median']:.1f} ({cpu['min']:.1f}-{cpu['max']:.1f}) |"
        )
    if "drawing" in result:
        d = result["drawing"]
        m = d["maxrss"]
        lines += [
            "",
            f"Drawing one {d['side']} x {d['side']} float32 micrograph's gallery pictures (`{DRAW}`, the writer's "
            f"drawing code), {result['service_runs']} runs: peak {_mib(m['median'])} MiB resident "
            f"({_mib(m['min'])}-{_mib(m['max'])}), {d['cpu_s']['median']:.1f} s CPU.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each operator command")
    parser.add_argument("--service-runs", type=int, default=3, help="starts of each service")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds a ready service idles before it is read")
    parser.add_argument("--draw-side", type=int, default=8192, help="side of the drawn micrograph (0: skip)")
    parser.add_argument("--only", nargs="*", help="measure only these (e.g. 'cryomae status' 'cryomae run')")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parents[2] / "docs" / "footprint.json")
    args = parser.parse_args()
    chosen = set(args.only or [*COMMANDS, *SERVICES, DRAW])
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "runs": args.runs,
        "service_runs": args.service_runs,
        "idle_s": args.idle,
        "commands": {},
        "services": {},
    }
    with tempfile.TemporaryDirectory(prefix="cryomae-footprint-") as tmp:
        folder = Path(tmp)
        for name in ("store", "state", "outputs"):
            (folder / name).mkdir()
        namespace = f"footprint-{uuid.uuid4().hex[:8]}"
        memory_env = _env(folder, "memory://", namespace)
        for name, cmd in COMMANDS.items():
            if name in chosen:
                cpu = [command_cpu(cmd, memory_env) for _ in range(args.runs)]
                result["commands"][name] = {"cpu_s": _summary(cpu), "runs_cpu_s": cpu}
                print(f"{name}: {statistics.median(cpu):.2f} s CPU", file=sys.stderr)
        rabbit_env = _env(folder, AMQP_URL, namespace)
        try:
            for name, cmd in SERVICES.items():
                if name in chosen:
                    env = memory_env if cmd[0] in ("run", "gallery") else rabbit_env
                    runs = [service_footprint(cmd, env, args.idle) for _ in range(args.service_runs)]
                    result["services"][name] = {k: _summary([r[k] for r in runs]) for k in runs[0]}
                    print(f"{name}: {_mib(result['services'][name]['rss']['median'])} MiB resident", file=sys.stderr)
        finally:
            delete_namespace(namespace)
        if DRAW in chosen and args.draw_side:
            result["drawing"] = drawing_peak(folder, memory_env, args.draw_side, args.service_runs)
            print(f"{DRAW}: {_mib(result['drawing']['maxrss']['median'])} MiB peak", file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(report(result))


if __name__ == "__main__":
    main()
