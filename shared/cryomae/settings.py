"""Settings of the live services and the operator CLI (pydantic-settings).

Read once in each process's ``main()`` and passed down. Sources, highest first: keyword arguments (the CLI's
options), environment variables with the prefix ``CRYOMAE_`` and ``__`` between nested names (for example
``CRYOMAE_BROKER__URL``, ``CRYOMAE_PICK__THRESHOLD``), a ``.env`` file in the working folder, files in the
secrets folder (``CRYOMAE_SECRETS_DIR``, default ``/run/secrets/cryomae`` where it exists: one file per secret,
named like the environment variable, e.g. ``cryomae_broker_password``), then the defaults below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cryomae.config import PickConfig, TrainConfig, WatchSettings, WatchTuning
from cryomae.io.micrographs import MAX_MICROGRAPH_PIXELS
from cryomae.messaging import redact_url

DEFAULT_SECRETS_DIR = Path("/run/secrets/cryomae")
SECRET_MASK = "********"  # what `cryomae config show` prints for a secret


class BrokerSettings(BaseModel):
    """Where messages go: ``memory://`` (one process) or ``amqp://user@host:port/vhost`` (RabbitMQ)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field("memory://", description="memory:// or amqp(s)://user@host:port/vhost (password apart)")
    namespace: str = Field("cryomae", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="queue name prefix")
    heartbeat: int = Field(30, ge=0, description="AMQP heartbeat, seconds")


class GallerySettings(BaseModel):
    """The session page the writer keeps beside each session's STAR files (``OUTPUTS/<project>/<session>/gallery``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="write the session gallery (pictures and page) as micrographs are picked")
    size: int = Field(512, ge=64, le=2048, description="longer side of each micrograph's picture, in pixels")


class Settings(BaseSettings):
    """Everything a service or the operator CLI needs."""

    model_config = SettingsConfigDict(
        env_prefix="CRYOMAE_",
        env_nested_delimiter="__",
        env_file=".env",
        # a .env file may hold other tools' variables (docker compose reads the same file); nested sections
        # still refuse unknown keys, so a misspelt CRYOMAE_WATCH__... fails loudly
        extra="ignore",
    )

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    broker_password: SecretStr | None = Field(None, description="broker password (best from the secrets folder)")
    store: Path = Field(Path("cryomae-store"), description="projects, exemplar sets and model versions")
    outputs: Path = Field(Path("cryomae-outputs"), description="per-session STAR files: OUTPUTS/<project>/<session>")
    state: Path = Field(Path("cryomae-state"), description="the watcher's ledger and other service state")
    data_roots: list[Path] = Field(
        default_factory=list,
        description="folders micrographs may come from; a message naming a path outside them is refused "
        "(empty: the current folder only)",
    )
    watch: WatchTuning = Field(default_factory=WatchTuning)
    gallery: GallerySettings = Field(default_factory=GallerySettings)
    pick: PickConfig = Field(default_factory=PickConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    device: str = Field(
        "auto", description="auto, cpu, cuda or cuda:N: the one device setting, for picking and training alike"
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads for torch and the BLAS libraries (default: the CPUs this process may use, from its "
        "affinity and its cgroup CPU quota; the Helm chart passes the container's CPU limit)",
    )
    model_check_seconds: float = Field(10.0, gt=0, description="how often a picker checks for a new model version")
    pick_workers: int | None = Field(
        None,
        ge=1,
        le=16,
        description="micrographs a picker works on at once (default: 2 on a GPU, so that one is read and its "
        "peaks thresholded on the CPU while the other is scored on the GPU; 1 on a CPU, where they would only "
        "share the cores)",
    )
    max_micrograph_pixels: int = Field(
        MAX_MICROGRAPH_PIXELS,
        ge=1,
        description="largest micrograph picked or trained from, in pixels (width x height), refused from its header "
        "before it is read; the default, 2^27 = 134 Mpx, admits 8k x 8k and K3 super-resolution (11520 x 8184)",
    )
    broker_wait_seconds: float = Field(
        120.0, ge=0, description="how long a service waits for the broker at start-up before exiting non-zero"
    )
    metrics_port: int | None = Field(
        9400, ge=0, le=65535, description="HTTP port of /metrics, /healthz and /readyz (0: any free port; null: off)"
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="address the metrics and health endpoint listens on; it has no authentication and names "
        "projects and model versions, so only this host by default (the container images and the Helm chart "
        "set 0.0.0.0, behind their network and a NetworkPolicy)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="least level logged by `cryomae run` and the services (other commands: --log-level)"
    )
    log_json: bool | None = Field(
        None,
        description="JSON log lines (default: `cryomae run` and the services when stderr is not a terminal; other "
        "commands only when true)",
    )
    log_file: Path | None = Field(
        None, description="write the services' log to this file (appended, rotated at 50 MB, 5 kept; default stderr)"
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        scheme = urlsplit(self.broker.url).scheme
        if scheme not in ("memory", "amqp", "amqps"):
            raise ValueError(f"broker.url must start with memory://, amqp:// or amqps://, got {scheme or '(none)'}://")
        for section in ("pick", "train"):  # one device setting: the services would not read these
            if "device" in getattr(self, section).model_fields_set:
                raise ValueError(
                    f"{section}.device (CRYOMAE_{section.upper()}__DEVICE) is not a service setting: set device "
                    "(CRYOMAE_DEVICE), which the picker and the trainer both use"
                )
        return self

    def roots(self) -> list[Path]:
        """The allowed data roots, resolved (the current folder when none are set)."""
        return [p.expanduser().resolve() for p in (self.data_roots or [Path.cwd()])]

    def watch_settings(self) -> WatchSettings:
        """The watcher's settings: the ``watch`` section with the data roots."""
        return WatchSettings(data_roots=self.roots(), max_pixels=self.max_micrograph_pixels, **self.watch.model_dump())

    def broker_url(self) -> str:
        """The broker URL with the password from the settings put in (never log this)."""
        url = self.broker.url
        if self.broker_password is None:
            return url
        parts = urlsplit(url)
        user = parts.username or "guest"
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        netloc = f"{quote(user, safe='')}:{quote(self.broker_password.get_secret_value(), safe='')}@{host}{port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with secrets hidden (``cryomae config show``)."""
        data = self.model_dump(mode="json")
        data["broker_password"] = SECRET_MASK if self.broker_password is not None else None
        data["broker"]["url"] = redact_url(self.broker.url, SECRET_MASK)
        return data


REFUSED = frozenset({"CRYOMAE_PICK__DEVICE", "CRYOMAE_TRAIN__DEVICE"})  # the one device setting is CRYOMAE_DEVICE


def reference() -> list[tuple[str, str, str]]:
    """Every setting a process reads, as (environment variable, default, meaning), in the model's order: the
    table of docs/settings.md (``cryomae config reference`` prints it; a test keeps the two the same)."""

    def rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
        for name, field in model.model_fields.items():
            env = prefix + name.upper()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out += rows(field.annotation, env + "__")
            elif env not in REFUSED:
                default = field.get_default(call_default_factory=True)
                shown = "none" if default is None or default == [] else f"`{json.dumps(default, default=str)}`"
                out.append((env, shown, field.description or ""))
        return out

    return rows(Settings, "CRYOMAE_")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """``reference`` as a Markdown table."""
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    lines += [f"| `{env}` | {default} | {_cell(text)} |" for env, default, text in reference()]
    return "\n".join(lines) + "\n"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, the secrets folder and ``overrides`` (the CLI's options)."""
    secrets = Path(os.environ.get("CRYOMAE_SECRETS_DIR", DEFAULT_SECRETS_DIR))
    if secrets.is_dir():
        return Settings(_secrets_dir=secrets, **overrides)
    return Settings(**overrides)
