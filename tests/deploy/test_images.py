"""The container images (deploy/docker) and the single-host compose install (deploy/compose), checked against the code.

Docker cannot run here, so these tests read the files the way Docker and Compose do (a small Dockerfile parser,
Compose's variable interpolation, a strict Compose-spec parser) and check what they name against the code: the
settings (every CRYOMAE_* variable is a field of ``cryomae.settings.Settings`` and the environments load), the
CLI (entrypoints and commands parse to the right sub-command and service), the HTTP port and probe (each
healthcheck command is run against a real ``HealthServer``), the pins in pyproject.toml, the files copied and
mounted, the Prometheus and Grafana configuration the compose file mounts, and the optional session gallery
(``cryomae gallery serve`` on the outputs, read-only, on 127.0.0.1 only).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import yaml
from compose_spec import PyCompose
from pydantic import BaseModel

from cryomae.gallery.server import make_server, serve_in_thread
from cryomae.operator.cli import build_parser, cmd_gallery_serve
from cryomae.service.app import SERVICES
from cryomae.service.metrics import HealthServer
from cryomae.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
COMPOSE_GPU = COMPOSE_DIR / "compose.gpu.yaml"
ENV_EXAMPLE = COMPOSE_DIR / "env.example"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

IMAGES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
METRICS_PORT = Settings().metrics_port
SECRET_NAME = "cryomae_broker_password"  # the file pydantic-settings reads broker_password from
# read by cryomae.settings.load_settings itself (where the secret files are), not a Settings field
NON_FIELD_VARIABLES = {"CRYOMAE_SECRETS_DIR"}
# the watcher lists session folders, the picker reads micrographs, the trainer the exemplars' micrograph
READS_MICROGRAPHS = {"watcher", "picker", "trainer", "writer"}  # the writer checks that they exist
# packages that compile or fetch: none of them may be installed in a final image stage
BUILD_TOOLS = re.compile(
    r"\b(build-essential|gcc|g\+\+|clang|make|cmake|git|curl|wget|[\w.+-]+-dev|python3\.\d+-venv)\b"
)


# ------------------------------------------------------------------------------------------------ settings


def _nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _nested_models(arg)


def setting_variables() -> set[str]:
    """Every environment variable Settings reads: CRYOMAE_<FIELD>, nested fields joined by ``__``."""
    names: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            names.add(prefix + name.upper())
            for sub in _nested_models(info.annotation):
                walk(sub, prefix + name.upper() + "__")

    walk(Settings, "CRYOMAE_")
    return names


SETTING_VARIABLES = setting_variables()


def assert_real_settings(names: set[str], where: str) -> None:
    unknown = sorted(n for n in names if n.startswith("CRYOMAE_") and n not in SETTING_VARIABLES | NON_FIELD_VARIABLES)
    assert not unknown, f"{where}: {unknown} are not settings (cryomae.settings.Settings fields)"


def load_with_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: Mapping[str, str]) -> Settings:
    """load_settings() in a process whose only CRYOMAE_* variables are ``env`` (cwd without a .env file)."""
    for name in list(os.environ):
        if name.upper().startswith("CRYOMAE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    workdir = tmp_path / "cwd"
    workdir.mkdir(exist_ok=True)
    monkeypatch.chdir(workdir)
    return load_settings()


# ------------------------------------------------------------------------------------------------ healthchecks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_probe(argv: list[str], port: int) -> subprocess.CompletedProcess[str]:
    """Run a healthcheck command (its ``python`` is this interpreter) with CRYOMAE_METRICS_PORT=port."""
    assert argv and argv[0] == "python", f"the healthcheck should run Python (no curl in the image): {argv}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CRYOMAE_")}
    env["CRYOMAE_METRICS_PORT"] = str(port)
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=30)


def check_probe_against_real_server(argv: list[str]) -> None:
    """The command passes while /healthz says alive (starting, or the main loop turning), fails on 503 (the loop
    has hung) and when nothing listens."""
    alive = HealthServer("127.0.0.1", 0, dict, stale_after_s=3600)
    alive.start()
    try:
        starting = run_probe(argv, alive.port)  # no beat yet: starting (e.g. waiting for the broker)
        assert starting.returncode == 0, f"healthcheck failed against a starting process: {starting.stderr}"
        alive.beat()
        turning = run_probe(argv, alive.port)
        assert turning.returncode == 0, f"healthcheck failed against a live /healthz: {turning.stderr}"
    finally:
        alive.stop()
    hung = HealthServer("127.0.0.1", 0, dict, stale_after_s=0.0)
    hung.start()
    try:
        hung.beat()  # and none since: with stale_after_s=0 every /healthz answers 503
        assert run_probe(argv, hung.port).returncode != 0, "healthcheck passed although /healthz answered 503"
    finally:
        hung.stop()
    assert run_probe(argv, free_port()).returncode != 0, "healthcheck passed with nothing listening"


def probe_default_port(code: str) -> int:
    """The port a healthcheck's Python code uses when CRYOMAE_METRICS_PORT is not set."""
    m = re.search(r"os\.environ\.get\('CRYOMAE_METRICS_PORT'\) or '(\d+)'", code)
    assert m, f"the healthcheck should read CRYOMAE_METRICS_PORT with a default: {code}"
    assert "/healthz" in code and "127.0.0.1" in code, code
    return int(m.group(1))


# ------------------------------------------------------------------------------------------------ Dockerfiles


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def split_flags(self) -> tuple[dict[str, str], str]:
        """Leading ``--name=value`` flags (COPY --from=..., HEALTHCHECK --interval=...) and the rest."""
        flags: dict[str, str] = {}
        rest = self.args
        while m := re.match(r"--([a-z-]+)(?:=(\S*))?\s+", rest):
            flags[m.group(1)] = m.group(2) or ""
            rest = rest[m.end() :]
        return flags, rest

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"line {self.line}: {self.args}"
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for ins in self.all("ENV"):
            env.update(parse_env(ins.args))
        return env

    def index(self, keyword: str) -> int:
        """Position of the last ``keyword`` instruction of the stage."""
        positions = [n for n, i in enumerate(self.instructions) if i.keyword == keyword]
        assert positions, f"stage FROM {self.base} has no {keyword}"
        return positions[-1]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse_instructions(text: str) -> list[Instruction]:
    """Instructions as Docker reads them: ``\\`` continues a line; comment and empty lines inside are dropped."""
    result: list[Instruction] = []
    buffer: str | None = None
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continued instruction, where Docker drops such lines
        if buffer is None:
            buffer, start = "", number
        if re.search(r"<<-?['\"]?[A-Z]+", stripped) and buffer == "":
            raise ValueError(f"line {number}: heredocs are not supported by this parser")
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        result.append(
            Instruction(keyword.upper(), " ".join(args.split()) if keyword.upper() == "RUN" else args.strip(), start)
        )
        buffer = None
    if buffer is not None:
        raise ValueError(f"line {start}: the last instruction ends with a line continuation")
    return result


def expand(value: str, variables: Mapping[str, str]) -> str:
    """``$NAME``, ``${NAME}`` and ``${NAME:-default}`` of ARG/ENV values, as Docker expands them."""

    def sub(m: re.Match[str]) -> str:
        name = m.group("name") or m.group("bare")
        default = m.group("default")
        got = variables.get(name, "")
        return got if got or default is None else default

    return re.sub(r"\$(?:\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}|(?P<bare>\w+))", sub, value)


def parse_env(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy form: ENV NAME value with spaces
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in parse_instructions(text):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            base = expand(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            key, _, default = ins.args.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    assert stages, "no FROM"
    return Dockerfile(global_args, stages)


def stage_arg(stage: Stage, name: str) -> str:
    for ins in stage.all("ARG"):
        key, _, default = ins.args.partition("=")
        if key.strip() == name:
            return default.strip().strip('"')
    raise AssertionError(f"stage FROM {stage.base} declares no ARG {name}")


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_build_context(relpath: str, patterns: list[str]) -> bool:
    """Whether .dockerignore lets ``relpath`` into the build context (the last matching pattern decides; a pattern
    matching a folder matches everything in it)."""
    parts = relpath.strip("/").split("/")
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return not excluded


def load_image(kind: str) -> Dockerfile:
    return parse_dockerfile(IMAGES[kind].read_text())


def pyproject_pin(package: str) -> str:
    for requirement in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{package}\s*==\s*([\w.+-]+)", requirement)
        if m:
            return m.group(1)
    raise AssertionError(f"pyproject.toml does not pin {package}")


def test_parser_reads_continuations_comments_and_forms():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.11-slim\n"
        "FROM ${BASE} AS build\n"
        "RUN apt-get update \\\n"
        "# a comment inside the continuation\n"
        "\n"
        "    && apt-get install -y x \\\n"
        "    && true\n"
        "ENV A=1 B='[\"/data\"]' \\\n"
        '    C="two words"\n'
        "FROM python:3.11-slim\n"
        "COPY --from=build --chown=1:1 /opt/venv /opt/venv\n"
        'HEALTHCHECK --interval=30s CMD ["python", "-c", "pass"]\n'
        'ENTRYPOINT ["cryomae"]\n'
    )
    parsed = parse_dockerfile(text)
    assert [s.base for s in parsed.stages] == ["python:3.11-slim", "python:3.11-slim"]
    assert parsed.stages[0].name == "build"
    (run,) = parsed.stages[0].all("RUN")
    assert run.args == "apt-get update && apt-get install -y x && true" and run.line == 4
    assert parsed.stages[0].env() == {"A": "1", "B": '["/data"]', "C": "two words"}
    flags, rest = parsed.final.all("COPY")[0].split_flags()
    assert flags == {"from": "build", "chown": "1:1"} and rest == "/opt/venv /opt/venv"
    flags, rest = parsed.final.all("HEALTHCHECK")[0].split_flags()
    assert flags == {"interval": "30s"} and rest == 'CMD ["python", "-c", "pass"]'
    assert parsed.final.all("ENTRYPOINT")[0].exec_form() == ["cryomae"]
    with pytest.raises(ValueError, match="continuation"):
        parse_instructions("RUN a \\\n")


@pytest.mark.parametrize("kind", IMAGES)
def test_base_images_are_python_3_11(kind):
    image = load_image(kind)
    assert len(image.stages) >= 2, "build in one stage, run from a clean final stage"
    for stage in image.stages:
        if kind == "cpu":
            assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base
        else:
            # Ubuntu 22.04 is the Ubuntu release that packages Python 3.11 (24.04 has 3.12)
            assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu22\.04", stage.base), stage.base
            installs = " ".join(i.args for i in stage.all("RUN") if "apt-get install" in i.args)
            assert re.search(r"\bpython3\.11\b", installs), f"stage FROM {stage.base} installs no python3.11"
    assert image.stages[0].name, "the build stage is named, for COPY --from"


@pytest.mark.parametrize("kind", IMAGES)
def test_torch_pins_and_wheel_index_match_pyproject_and_image(kind):
    image = load_image(kind)
    build = image.stages[0]
    text = IMAGES[kind].read_text()
    for package in ("torch", "torchvision"):
        pins = set(re.findall(rf"\b{package}==([\w.+-]+)", text))
        assert pins == {pyproject_pin(package)}, f"{IMAGES[kind].name} pins {package} {pins}; pyproject.toml differs"
    runs = [i.args for i in build.all("RUN")]
    torch_run = next(n for n, r in enumerate(runs) if re.search(r"\btorch==", r))
    project_run = next(n for n, r in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", r))
    assert torch_run < project_run, "PyTorch comes from its own index before `pip install .` resolves the rest"
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_run]
    index = stage_arg(build, "TORCH_INDEX_URL")
    if kind == "cpu":
        assert index.endswith("/whl/cpu"), index
    else:
        major, minor = re.findall(r"nvidia/cuda:(\d+)\.(\d+)", image.final.base)[0]
        assert index.endswith(f"/whl/cu{major}{minor}"), f"{index} is not the wheels of the base image's CUDA"


@pytest.mark.parametrize("kind", IMAGES)
def test_copy_sources_exist_in_the_build_context(kind):
    image = load_image(kind)
    patterns = dockerignore_patterns()
    names = [s.name for s in image.stages]
    copied: list[str] = []
    for n, stage in enumerate(image.stages):
        assert not stage.all("ADD"), "COPY, not ADD"
        for ins in stage.all("COPY"):
            flags, rest = ins.split_flags()
            sources = json.loads(rest)[:-1] if rest.startswith("[") else rest.split()[:-1]
            if "from" in flags:
                assert flags["from"] in names[:n], (
                    f"line {ins.line}: COPY --from={flags['from']} names no earlier stage"
                )
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"line {ins.line}: COPY source {source} is not in the repository"
                assert in_build_context(source, patterns), f"line {ins.line}: .dockerignore leaves out {source}"
                copied.append(source.rstrip("/"))
    # what `pip install .` needs: pyproject.toml, the readme it names and the package folder it finds
    assert "pyproject.toml" in copied
    assert PYPROJECT["project"]["readme"] in copied
    for where in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]:
        assert f"{where}/cryomae" in copied


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for path in (
        "pyproject.toml",
        "README.md",
        "shared/cryomae/__init__.py",
        "shared/cryomae/py.typed",
        "shared/cryomae/service/app.py",
    ):
        assert in_build_context(path, patterns), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_images.py",
        "runs/demo/report.json",
        "deploy/compose/secrets/cryomae_broker_password",
        "shared/cryomae/__pycache__/cli.cpython-311.pyc",
        "shared/cryomae.egg-info/PKG-INFO",
        ".env",
    ):
        assert not in_build_context(path, patterns), path


@pytest.mark.parametrize("kind", IMAGES)
def test_final_stage_has_no_build_tools(kind):
    final = load_image(kind).final
    for ins in final.all("RUN"):
        assert "pip install" not in ins.args, f"line {ins.line}: installs with pip in the final stage"
        if "apt-get install" in ins.args:
            packages = ins.args.split("apt-get install", 1)[1].split("&&")[0]
            assert not BUILD_TOOLS.search(packages), f"line {ins.line}: build tools in the final stage: {packages}"
            assert "--no-install-recommends" in ins.args and "rm -rf /var/lib/apt/lists" in ins.args
    (venv,) = [i for i in final.all("COPY") if i.split_flags()[0].get("from")]
    assert venv.split_flags()[1].split() == ["/opt/venv", "/opt/venv"], "only the virtual environment comes over"
    assert final.env()["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.parametrize("kind", IMAGES)
def test_runs_as_a_fixed_non_root_user(kind):
    final = load_image(kind).final
    user = final.all("USER")[-1].args
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert m, f"USER {user}: numeric, so that Kubernetes' runAsNonRoot can check it"
    uid = int(m.group(1))
    assert uid != 0 and (m.group(2) is None or int(m.group(2)) != 0)
    assert final.index("USER") < final.index("ENTRYPOINT") and final.index("USER") < final.index("CMD")
    creates = " ".join(i.args for i in final.all("RUN"))
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", creates), f"no user with UID {uid} is created"
    workdir = final.all("WORKDIR")[-1].args
    assert workdir.startswith("/"), workdir


@pytest.mark.parametrize("kind", IMAGES)
def test_environment_is_settings_and_points_at_the_volumes(kind, monkeypatch, tmp_path):
    final = load_image(kind).final
    env = final.env()
    assert_real_settings(set(env), IMAGES[kind].name)
    settings = load_with_environment(monkeypatch, tmp_path, {k: v for k, v in env.items() if k.startswith("CRYOMAE_")})
    volumes = set(final.all("VOLUME")[-1].exec_form())
    writable = {str(settings.store), str(settings.outputs), str(settings.state)}
    assert writable <= volumes, f"{writable - volumes} are not declared as volumes"
    assert {str(r) for r in settings.data_roots} <= volumes
    settings.watch_settings()  # data roots absolute
    creates = " ".join(i.args for i in final.all("RUN"))
    for path in writable:
        assert re.search(rf"chown [^&]*{re.escape(path)}\b", creates), f"{path} is not given to the user"
    assert settings.log_json is True
    assert settings.metrics_port == METRICS_PORT
    # item 17: the workstation default is 127.0.0.1; a container must listen on its network for the probes and
    # Prometheus (docker publishes nothing, the compose network and the chart's NetworkPolicy protect it)
    assert settings.metrics_host == "0.0.0.0"
    if kind == "cpu":
        assert settings.device == "cpu"


@pytest.mark.parametrize("kind", IMAGES)
def test_exposes_the_metrics_port(kind):
    final = load_image(kind).final
    ports = {p.split("/")[0] for ins in final.all("EXPOSE") for p in ins.args.split()}
    assert str(METRICS_PORT) in ports


@pytest.mark.parametrize("kind", IMAGES)
def test_image_healthcheck_probes_healthz(kind):
    final = load_image(kind).final
    (check,) = final.all("HEALTHCHECK")
    flags, rest = check.split_flags()
    assert rest.startswith("CMD ")
    argv = json.loads(rest[4:])
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)
    assert probe_default_port(argv[-1]) == METRICS_PORT
    check_probe_against_real_server(argv)


@pytest.mark.parametrize("kind", IMAGES)
def test_entrypoint_is_the_cryomae_cli_and_runs_everything_by_default(kind):
    final = load_image(kind).final
    entrypoint = final.all("ENTRYPOINT")[-1].exec_form()
    command = final.all("CMD")[-1].exec_form()
    assert entrypoint == ["cryomae"] and "cryomae" in PYPROJECT["project"]["scripts"]
    args = build_parser().parse_args(command)
    assert args.func.__name__ == "cmd_run" and sorted(args.services) == sorted(SERVICES)


# ------------------------------------------------------------------------------------------------ compose


class MissingVariableError(Exception):
    pass


VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_]\w*))")


def interpolate_text(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error},
    ${NAME:+alt}, ${NAME+alt}."""

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        expr = re.fullmatch(r"([A-Za-z_]\w*)(?:(:?[-?+])(.*))?", m.group("braced"), re.S)
        assert expr, f"malformed ${{{m.group('braced')}}}"
        name, op = expr.group(1), expr.group(2)
        arg: str = expr.group(3) or ""
        value = env.get(name)
        is_set = bool(value) if op and op.startswith(":") else value is not None  # ":" also refuses empty values
        if op is None:
            return value or ""
        if op in (":-", "-"):
            return value if is_set and value is not None else arg
        if op in (":+", "+"):
            return arg if is_set else ""
        if not is_set:
            raise MissingVariableError(f"{name}: {arg}")
        return value or ""

    return VARIABLE.sub(sub, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


def variables_used(node: Any) -> set[str]:
    if isinstance(node, str):
        found = set()
        for m in VARIABLE.finditer(node):
            if m.group("named"):
                found.add(m.group("named"))
            elif m.group("braced") is not None:
                found.add(re.split(r"[:?+-]", m.group("braced"), maxsplit=1)[0])
        return found
    if isinstance(node, list):
        return set().union(*(variables_used(v) for v in node)) if node else set()
    if isinstance(node, dict):
        return set().union(*(variables_used(v) for v in node.values())) if node else set()
    return set()


def env_example() -> dict[str, str]:
    pairs = [ln.split("=", 1) for ln in ENV_EXAMPLE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def raw_compose(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, for what ours use: mappings merge key by key, the rest replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return override


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return cast(dict[str, Any], interpolate(raw_compose(COMPOSE), env_example()))


@pytest.fixture(scope="module")
def compose_gpu(compose) -> dict[str, Any]:
    return cast(dict[str, Any], merge(compose, interpolate(raw_compose(COMPOSE_GPU), env_example())))


def cryomae_services(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from deploy/docker (the cryomae image)."""
    return {
        name: svc
        for name, svc in config["services"].items()
        if str(svc.get("build", {}).get("dockerfile", "")).startswith("deploy/docker/")
    }


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool
    bind: bool


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    result = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            source, target = entry.get("source", ""), entry["target"]
            read_only, bind = bool(entry.get("read_only")), entry.get("type") == "bind"
        else:
            parts = entry.split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
            bind = source.startswith((".", "/", "~"))
        result.append(Mount(source, target, read_only, bind))
    return result


def mount_at(service: Mapping[str, Any], target: str) -> Mount:
    found = [m for m in mounts(service) if PurePosixPath(m.target) == PurePosixPath(target)]
    assert len(found) == 1, f"nothing (or more than one thing) is mounted at {target}"
    return found[0]


def secret_targets(service: Mapping[str, Any]) -> dict[str, PurePosixPath]:
    targets = {}
    for entry in service.get("secrets", []):
        source = entry if isinstance(entry, str) else entry["source"]
        target = entry.get("target", source) if isinstance(entry, dict) else source
        targets[source] = PurePosixPath(target if target.startswith("/") else f"/run/secrets/{target}")
    return targets


def container_ports(service: Mapping[str, Any]) -> set[int]:
    ports = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    ports |= {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}
    return ports


def test_compose_files_follow_the_compose_specification(compose, compose_gpu):
    for config in (compose, compose_gpu, interpolate(raw_compose(COMPOSE_GPU), env_example())):
        PyCompose.from_json(json.dumps(config)).validate()  # strict: unknown keys, bad durations, undefined refs
    assert set(raw_compose(COMPOSE_GPU)["services"]) <= set(compose["services"])


def test_host_paths_are_required_and_documented():
    raw = raw_compose(COMPOSE)
    example = env_example()
    with pytest.raises(MissingVariableError, match="DATA_DIR"):
        interpolate(raw, {k: v for k, v in example.items() if k != "DATA_DIR"})
    with pytest.raises(MissingVariableError, match="OUTPUTS_DIR"):
        interpolate(raw, {k: v for k, v in example.items() if k != "OUTPUTS_DIR"})
    used = variables_used(raw) | variables_used(raw_compose(COMPOSE_GPU))
    assert used == set(example), f"compose variables {sorted(used)} vs env.example {sorted(example)}"
    # compose-only variables are not cryomae settings, and must not look like them
    assert not [v for v in used if v.startswith("CRYOMAE_")]


def test_each_live_service_runs_once(compose):
    services = cryomae_services(compose)
    ran = []
    for name, svc in services.items():
        args = build_parser().parse_args(svc["command"])
        assert args.func.__name__ == "cmd_service", f"{name}: {svc['command']} is not `cryomae service NAME`"
        assert args.name == name, f"service {name} runs `cryomae service {args.name}`"
        ran.append(args.name)
    assert sorted(ran) == sorted(SERVICES)
    for svc in services.values():
        build = svc["build"]
        assert (COMPOSE_DIR / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("name", SERVICES)
def test_service_environment_loads_as_settings(name, gpu, compose, compose_gpu, monkeypatch, tmp_path):
    config = compose_gpu if gpu else compose
    svc = config["services"][name]
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert_real_settings(set(env), f"compose service {name}")
    # the broker password: a compose secret mounted as <CRYOMAE_SECRETS_DIR>/cryomae_broker_password
    secrets_dir = PurePosixPath(env["CRYOMAE_SECRETS_DIR"])
    targets = secret_targets(svc)
    assert secrets_dir / SECRET_NAME in targets.values(), f"{name}: no secret mounted at {secrets_dir / SECRET_NAME}"
    here = tmp_path / "secrets"
    here.mkdir()
    (here / SECRET_NAME).write_text("s3cret-Pw\n")
    settings = load_with_environment(monkeypatch, tmp_path, {**env, "CRYOMAE_SECRETS_DIR": str(here)})

    url = urlsplit(settings.broker.url)
    assert url.scheme == "amqp" and url.password is None, "no password in the broker URL"
    assert url.hostname in config["services"], f"broker host {url.hostname} is no compose service"
    rabbit = config["services"][url.hostname]
    assert url.username == rabbit["environment"]["RABBITMQ_DEFAULT_USER"]
    assert (url.port or 5672) in container_ports(rabbit)
    assert urlsplit(settings.broker_url()).password == "s3cret-Pw"
    assert {"rabbitmq": {"condition": "service_healthy"}}.items() <= svc["depends_on"].items()

    assert mount_at(svc, str(settings.store)).source == "store"
    # item 17: listening on the compose network (Prometheus, the healthcheck), never published on the host
    assert settings.metrics_host == "0.0.0.0"
    assert str(settings.metrics_port) not in {str(p).split(":")[-1].split("/")[0] for p in svc.get("ports", [])}
    if name in READS_MICROGRAPHS:
        for root in settings.watch_settings().data_roots:
            assert mount_at(svc, str(root)).read_only, f"{name}: micrographs are mounted read-write"
    if name in ("watcher", "writer"):
        assert not mount_at(svc, str(settings.outputs)).read_only
    if name == "writer":
        assert mount_at(svc, str(settings.store)).read_only, "the writer only checks projects and model versions"
    if name == "watcher":
        state = mount_at(svc, str(settings.state))
        assert state.source in config["volumes"], "the watcher's ledger lives on a named volume"
        others = [m for n, s in cryomae_services(config).items() if n != name for m in mounts(s)]
        assert state.source not in {m.source for m in others}, "one watcher per state folder"
    if gpu and name == "picker":
        assert settings.device == "cuda"


def test_every_cryomae_service_mounts_the_same_store_and_outputs(compose):
    services = cryomae_services(compose)
    sources = {mount_at(s, "/store").source for s in services.values()}
    assert sources == {"store"}
    outputs = {m.source for s in services.values() for m in mounts(s) if m.target == "/outputs"}
    assert len(outputs) == 1, f"the writer and the CLI (watcher) see different outputs: {outputs}"


@pytest.mark.parametrize("name", SERVICES)
def test_compose_healthcheck_probes_healthz(name, compose):
    test = compose["services"][name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert probe_default_port(test[-1]) == METRICS_PORT
    check_probe_against_real_server(test[1:])


def test_mounts_volumes_and_dependencies_resolve(compose):
    raw = raw_compose(COMPOSE)
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, svc in compose["services"].items():
        for mount, unresolved in zip(mounts(svc), raw["services"][name].get("volumes", []), strict=True):
            if mount.bind and str(unresolved).startswith("$"):
                # a host path of this installation: a required variable (documented in env.example)
                assert re.match(r"\$\{\w+:\?[^}]+\}:", str(unresolved)), f"{name}: {unresolved} needs ${{NAME:?...}}"
            elif mount.bind:
                assert (COMPOSE_DIR / mount.source).exists(), f"{name}: bind mount {mount.source} does not exist"
            else:
                assert mount.source in declared, f"{name}: volume {mount.source} is not declared"
                used.add(mount.source)
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in compose["services"], f"{name} depends on unknown service {dep}"
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in compose["services"][dep], f"{name} waits for {dep} healthy, it has no check"
    assert used == declared, f"declared but unused volumes: {declared - used}"
    for secret in compose["secrets"].values():
        path = COMPOSE_DIR / secret["file"]
        assert path.parent.is_dir()
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False).returncode == 0
        assert ignored, f"{path} (a password) is not ignored by git"


def test_rabbitmq_has_management_prometheus_and_the_cryomae_user(compose):
    rabbit = compose["services"]["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:(3\.13|4\.\d+)-management", rabbit["image"]), rabbit["image"]
    assert rabbit["hostname"] == "rabbitmq", "a fixed node name keeps the data across re-creations"
    assert {5672, 15672, 15692} <= container_ports(rabbit)
    assert rabbit["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    plugins = (COMPOSE_DIR / mount_at(rabbit, "/etc/rabbitmq/enabled_plugins").source).read_text().strip()
    listed = re.fullmatch(r"\[(.*)\]\.", plugins, re.S)
    assert listed, f"enabled_plugins is not an Erlang list: {plugins}"
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= {p.strip() for p in listed.group(1).split(",")}
    conf = next(m for m in mounts(rabbit) if m.target.startswith("/etc/rabbitmq/conf.d/"))
    settings = {
        k.strip(): v.strip()
        for k, _, v in (ln.partition("=") for ln in (COMPOSE_DIR / conf.source).read_text().splitlines())
        if k.strip() and not k.startswith("#")
    }
    assert int(settings["consumer_timeout"]) > 30 * 60 * 1000, "longer than RabbitMQ's default, for trainings"
    assert int(settings["prometheus.tcp.port"]) == 15692 and int(settings["management.tcp.port"]) == 15672


def test_rabbitmq_gets_the_password_cryomae_reads(compose, tmp_path, monkeypatch):
    rabbit = compose["services"]["rabbitmq"]
    (target,) = [t for s, t in secret_targets(rabbit).items() if s == "cryomae_broker_password"]
    entrypoint = rabbit["entrypoint"]
    assert entrypoint[:2] == ["/bin/bash", "-c"] and str(target) in entrypoint[2]
    # run the entrypoint with the secret in a temporary file and a stand-in for the image's docker-entrypoint.sh
    secret = tmp_path / "password"
    secret.write_text("pw with spaces\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "docker-entrypoint.sh"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$RABBITMQ_DEFAULT_PASS" "$@"\n')
    stand_in.chmod(0o755)
    script = entrypoint[2].replace(str(target), str(secret))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(
        [*entrypoint[:2], script, *entrypoint[3:], *rabbit["command"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    assert out == ["pw with spaces", "rabbitmq-server"]
    # without the secret file RabbitMQ does not start (rather than start with an empty password)
    missing = entrypoint[2].replace(str(target), str(tmp_path / "absent"))
    failed = subprocess.run(
        [*entrypoint[:2], missing, *entrypoint[3:], *rabbit["command"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert failed.returncode != 0 and "rabbitmq-server" not in failed.stdout
    # ... the same password cryomae reads from the same file
    here = tmp_path / "secrets"
    here.mkdir()
    (here / SECRET_NAME).write_text(secret.read_text())
    svc = compose["services"]["picker"]
    settings = load_with_environment(monkeypatch, tmp_path, {**svc["environment"], "CRYOMAE_SECRETS_DIR": str(here)})
    assert settings.broker_password is not None and settings.broker_password.get_secret_value() == out[0]


def test_prometheus_scrapes_the_services_and_loads_the_alerts(compose):
    prometheus = compose["services"]["prometheus"]
    config_target = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config_mount = mount_at(prometheus, config_target)
    config = yaml.safe_load((COMPOSE_DIR / config_mount.source).read_text())
    assert (COMPOSE_DIR / config_mount.source).resolve() == ROOT / "deploy/prometheus/prometheus.yml"
    for rule_file in config.get("rule_files", []):
        target = PurePosixPath(config_target).parent / rule_file
        source = COMPOSE_DIR / mount_at(prometheus, str(target)).source
        assert source.is_file() and yaml.safe_load(source.read_text())["groups"], f"{rule_file}: no alert groups"
    scraped: dict[str, set[int]] = {}
    for job in config["scrape_configs"]:
        targets = [tuple(t.rsplit(":", 1)) for static in job.get("static_configs", []) for t in static["targets"]]
        # Docker's DNS answers a service name with the address of every replica (pickers scale)
        targets += [(n, sd["port"]) for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        assert targets, f"job {job['job_name']} has no target this test knows how to read"
        for host, port in targets:
            assert host in compose["services"], f"job {job['job_name']} scrapes {host}, no compose service"
            assert int(port) in container_ports(compose["services"][host]), f"{host} does not expose {port}"
            scraped.setdefault(host, set()).add(int(port))
    for name in cryomae_services(compose):
        assert scraped.get(name) == {METRICS_PORT}, f"{name} is not scraped on {METRICS_PORT}"
    assert scraped.get("rabbitmq") == {15692}, "RabbitMQ's Prometheus endpoint is not scraped"


def test_grafana_is_provisioned_with_the_datasource_and_dashboards(compose):
    grafana = compose["services"]["grafana"]
    provisioning = mount_at(grafana, "/etc/grafana/provisioning")
    assert (COMPOSE_DIR / provisioning.source).resolve() == ROOT / "deploy/grafana/provisioning"
    (dashboards,) = [
        m for m in mounts(grafana) if (COMPOSE_DIR / m.source).resolve() == ROOT / "deploy/grafana/dashboards"
    ]
    assert list((ROOT / "deploy/grafana/dashboards").glob("*.json")), "no dashboards to provision"
    providers = [
        p
        for f in sorted((ROOT / "deploy/grafana/provisioning/dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert providers and all(PurePosixPath(p["options"]["path"]) == PurePosixPath(dashboards.target) for p in providers)
    datasources = [
        d
        for f in sorted((ROOT / "deploy/grafana/provisioning/datasources").glob("*.y*ml"))
        for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus
    for source in prometheus:
        url = urlsplit(source["url"])
        assert url.hostname == "prometheus" and url.hostname in compose["services"]
        assert url.port == 9090  # Prometheus's port, as long as the compose file does not move it:
        assert not any("--web.listen-address" in a for a in compose["services"]["prometheus"]["command"])
    password_file = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert PurePosixPath(password_file) in secret_targets(grafana).values()


def test_gpu_override_reserves_a_gpu_for_the_picker_with_the_cuda_image(compose_gpu):
    picker = compose_gpu["services"]["picker"]
    (device,) = picker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert picker["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda"
    assert (COMPOSE_DIR / picker["build"]["context"]).resolve() == ROOT
    others = {n: s for n, s in cryomae_services(compose_gpu).items() if n != "picker"}
    assert all(s["build"]["dockerfile"] == "deploy/docker/Dockerfile" for s in others.values())


def test_deploy_readme_names_files_that_exist():
    text = (ROOT / "deploy" / "README.md").read_text()
    named = set(re.findall(r"(?<![\w/.-])((?:deploy|tests|shared|helm)/[\w./-]*[\w])", text))
    assert named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"deploy/README.md names missing files: {missing}"
    for command in (
        "docker build -f deploy/docker/Dockerfile ",
        "docker build -f deploy/docker/Dockerfile.cuda ",
        "docker compose up -d",
        "compose.gpu.yaml",
    ):
        assert command in text, command


# ------------------------------------------------------------------------------------------------ session gallery


def test_gallery_serves_the_outputs_read_only_on_this_host_only(compose, monkeypatch, tmp_path):
    gallery = compose["services"]["gallery"]
    writer = compose["services"]["writer"]
    assert "profiles" not in gallery, "compose serves the session pages with the rest (on 127.0.0.1 only)"
    # the services' image (they build it; no second build of the same tag), whose entrypoint is the cryomae CLI
    assert "gallery" not in cryomae_services(compose) and "build" not in gallery
    assert gallery["image"] == writer["image"]
    assert load_image("cpu").final.all("ENTRYPOINT")[-1].exec_form() == ["cryomae"]
    args = build_parser().parse_args(gallery["command"])
    assert args.func is cmd_gallery_serve
    assert (args.host, args.port, args.outputs) == ("0.0.0.0", 8080, PurePosixPath("/outputs"))
    assert args.project is None and args.session is None  # every session under the outputs folder
    # the folder the writer writes, mounted read-only, and nothing else: no data, no store, no broker, no secret
    (outputs,) = mounts(gallery)
    assert PurePosixPath(outputs.target) == PurePosixPath(args.outputs) and outputs.read_only
    assert outputs.source == mount_at(writer, "/outputs").source
    assert not mount_at(writer, "/outputs").read_only
    assert "secrets" not in gallery and "depends_on" not in gallery
    env = {k: str(v) for k, v in gallery["environment"].items()}
    assert_real_settings(set(env), "compose service gallery")
    settings = load_with_environment(monkeypatch, tmp_path, {k: v for k, v in env.items() if k.startswith("CRYOMAE_")})
    assert PurePosixPath(settings.outputs) == PurePosixPath(args.outputs)
    # a read-only root filesystem, the image's non-root user, no capabilities, no privilege escalation
    assert gallery["read_only"] is True
    assert gallery["user"] == load_image("cpu").final.all("USER")[-1].args
    assert all(int(i) != 0 for i in gallery["user"].split(":"))
    assert gallery["cap_drop"] == ["ALL"] and "cap_add" not in gallery
    assert "no-new-privileges:true" in gallery["security_opt"]
    assert not gallery.get("privileged", False)
    # published on the loopback address only, on the port it listens on
    assert gallery["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]


def test_gallery_healthcheck_probes_the_servers_healthz(compose, tmp_path):
    gallery = compose["services"]["gallery"]
    args = build_parser().parse_args(gallery["command"])
    check = gallery["healthcheck"]
    assert {"interval", "timeout", "retries", "start_period"} <= set(check)
    test = check["test"]
    assert test[:3] == ["CMD", "python", "-c"], "Python's urllib: the image has no curl"
    here = f"http://127.0.0.1:{args.port}/healthz"
    assert here in test[3]

    def probe(port: int) -> subprocess.CompletedProcess[str]:
        return run_probe(["python", "-c", test[3].replace(here, f"http://127.0.0.1:{port}/healthz")], port)

    # against the real server (cryomae.gallery.server) on an outputs folder: passes; fails with nothing listening
    server = make_server(tmp_path, "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        passed = probe(int(server.server_address[1]))
        assert passed.returncode == 0, f"healthcheck failed against the gallery server: {passed.stderr}"
    finally:
        server.shutdown()
        server.server_close()
    assert probe(free_port()).returncode != 0, "healthcheck passed with nothing listening"
