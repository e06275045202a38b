"""The Helm chart ``helm/cryomae``, linted and rendered offline by the real Helm engine (``helm-python-sdk``, Helm's
Go SDK behind ctypes) for several values scenarios; every rendered Kubernetes object is validated against the
Kubernetes schemas (``kubernetes-validate``, strict: unknown fields fail) of the oldest and newest supported
versions, and the custom resources (ServiceMonitor, PrometheusRule, KEDA) are checked field by field.

Beyond validity, the tests check what a wrong chart would break: the command each pod runs, the probes' port and
paths, the security context, the broker password (a file from an existing Secret where ``cryomae.settings`` looks
for it, never a literal), that the CRYOMAE_* environment loads into ``cryomae.settings.Settings`` with the paths
the pods mount, the config checksum that rolls pods, the KEDA queue name, the schema's refusals, that the
alert rules and dashboards the chart ships are the ones under ``deploy/``, and that the optional session gallery
(``gallery.enabled``) is a read-only, non-root web server on the writer's outputs, with its Service, Ingress and
NetworkPolicy.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from cryomae.config import PickConfig, TrainConfig, WatchTuning
from cryomae.messaging import topology
from cryomae.operator import cli
from cryomae.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cryomae"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
COMPOSE_PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"

KUBE_VERSIONS = ("1.25.0", "1.37.0")  # Chart.yaml's kubeVersion floor, and the newest kubernetes-validate knows
PASSWORD_FILE = "cryomae_broker_password"  # the secrets-folder file name cryomae.settings reads the password from
SECRETS_DIR_ENV = "CRYOMAE_SECRETS_DIR"  # read by cryomae.settings.load_settings, not a Settings field

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {"release": "cryomae", "namespace": "default", "values": {}},
    # GPU pickers scaled by KEDA, an existing claim per shared volume, RabbitMQ scraped too, tuned settings
    "gpu-keda-claims": {
        "release": "krios",
        "namespace": "cryoem",
        "values": {
            "image": {"repository": "registry.example.org/cryomae", "tag": "0.1.0", "gpuTag": "0.1.0-cuda"},
            "picker": {
                "replicas": 3,
                "gpu": 1,
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {
                    "podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 100,
                                "podAffinityTerm": {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "picker"}},
                                },
                            }
                        ]
                    }
                },
                "keda": {
                    "enabled": True,
                    "minReplicas": 0,
                    "maxReplicas": 6,
                    "queueLength": 10,
                    "vhost": "cryomae",
                    "auth": {"existingSecret": "rabbitmq-management", "hostKey": "url"},
                },
            },
            "trainer": {"gpu": 1, "device": "cuda:0"},
            "persistence": {
                "data": {"existingClaim": "krios-data", "mountPath": "/mnt/krios", "subPath": "epu"},
                "store": {"existingClaim": "cryomae-models"},
                "outputs": {"existingClaim": "cryomae-outputs", "mountPath": "/mnt/processing/cryomae"},
            },
            "settings": {
                "dataRoots": ["/mnt/krios"],
                "logLevel": "debug",
                "pickWorkers": 3,
                "watch": {"mode": "poll", "poll_interval": 2.5},
                "pick": {"threshold": 0.3, "batch_size": 4096},
                "train": {"preset": "fast", "epochs": 20, "highpass": None},
            },
            "serviceMonitor": {
                "labels": {"release": "kube-prometheus-stack"},
                "rabbitmq": {
                    "enabled": True,
                    "namespace": "rabbitmq",
                    "selector": {"app.kubernetes.io/name": "rabbitmq"},
                },
            },
            "prometheusRule": {"labels": {"release": "kube-prometheus-stack"}},
            "dashboards": {"namespace": "monitoring"},
            # Prometheus of the monitoring namespace only; probes from the nodes' range (a CNI that filters them)
            "networkPolicy": {
                "metricsFrom": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                    }
                ],
                "probeCIDRs": ["10.0.0.0/16", "fd00:10::/64"],
            },
        },
    },
    # everything optional off: no Prometheus Operator, no Grafana, no KEDA, no trainer; data from an inline NFS volume
    "optional-off": {
        "release": "cryomae",
        "namespace": "cryomae",
        "values": {
            "serviceMonitor": {"enabled": False},
            "prometheusRule": {"enabled": False},
            "dashboards": {"enabled": False},
            "picker": {"keda": {"enabled": False}},
            "trainer": {"enabled": False},
            "networkPolicy": {"enabled": False},
            "persistence": {
                "data": {"volume": {"nfs": {"server": "nas.example.org", "path": "/krios", "readOnly": True}}}
            },
        },
    },
    # another namespace, broker namespace, Secret name and key, secrets folder, metrics port and full name
    "custom-names": {
        "release": "titan",
        "namespace": "facility-live",
        "values": {
            "fullnameOverride": "picking",
            "broker": {
                "url": "amqps://picker@rabbitmq.messaging.svc:5671/facility",
                "namespace": "titan-krios",
                "existingSecret": "rabbitmq-cryomae-user",
                "passwordKey": "cryomae-password",
            },
            "secretsDir": "/etc/cryomae/secrets",
            "metricsPort": 9500,
            "dashboards": {"exclude": ["cryomae-facility.json"]},
        },
    },
}

# The session gallery switched on (gallery.enabled); kept apart from SCENARIOS, whose tests count the four services'
# Deployments and metrics Services. Linted and validated like them (ALL_SCENARIOS).
GALLERY_SCENARIOS: dict[str, dict[str, Any]] = {
    # switched on, every other value at its default
    "gallery": {"release": "cryomae", "namespace": "default", "values": {"gallery": {"enabled": True}}},
    # an Ingress with TLS and an authentication annotation, the outputs from an existing claim under another path
    # (and a subPath), its own port, replicas and peers; GPU pickers (the gallery stays on the CPU image)
    "gallery-ingress": {
        "release": "krios",
        "namespace": "cryoem",
        "values": {
            "image": {"repository": "registry.example.org/cryomae", "tag": "0.1.0", "gpuTag": "0.1.0-cuda"},
            "picker": {"gpu": 1},
            "persistence": {
                "outputs": {
                    "existingClaim": "cryomae-outputs",
                    "mountPath": "/mnt/processing/cryomae",
                    "subPath": "live",
                }
            },
            "gallery": {
                "enabled": True,
                "replicas": 2,
                "port": 8081,
                "service": {"type": "ClusterIP", "port": 80},
                "ingress": {
                    "enabled": True,
                    "className": "nginx",
                    "host": "gallery.krios.example.org",
                    "path": "/",
                    "pathType": "Prefix",
                    "annotations": {"nginx.ingress.kubernetes.io/auth-url": "https://sso.example.org/oauth2/auth"},
                    "tls": [{"secretName": "gallery-tls", "hosts": ["gallery.krios.example.org"]}],
                },
                "networkPolicy": {
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
                },
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "podAnnotations": {"example.org/owner": "cryo-em"},
                "podLabels": {"example.org/tier": "web"},
            },
        },
    },
    # the gallery beside the pickers alone: no writer, no trainer (the outputs claim is made for the gallery), no
    # NetworkPolicy, a NodePort Service
    "gallery-only": {
        "release": "cryomae",
        "namespace": "cryomae",
        "values": {
            "writer": {"enabled": False},
            "trainer": {"enabled": False},
            "networkPolicy": {"enabled": False},
            "gallery": {"enabled": True, "service": {"type": "NodePort", "port": 8080}},
        },
    },
}
ALL_SCENARIOS: dict[str, dict[str, Any]] = {**SCENARIOS, **GALLERY_SCENARIOS}


# ------------------------------------------------------------------------------------------ rendering


@cache
def _chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def _render(values: dict[str, Any], release: str = "cryomae", namespace: str = "default") -> dict[str, str]:
    return _chart().render(values=values, name=release, namespace=namespace)


@cache
def _rendered(scenario: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(template path -> rendered text, every object) of a scenario."""
    s = ALL_SCENARIOS[scenario]
    out = _render(s["values"], s["release"], s["namespace"])
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    return out, docs


def _objects(scenario: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in _rendered(scenario)[1] if d["kind"] == kind]


def _one(scenario: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _objects(scenario, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"{scenario}: expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def _values(scenario: str) -> dict[str, Any]:
    return _chart().merge_values(ALL_SCENARIOS[scenario]["values"])


def _fullname(scenario: str) -> str:
    return _settings_cm_name(scenario).removesuffix("-settings")


def _settings_cm_name(scenario: str) -> str:
    names = [
        d["metadata"]["name"] for d in _objects(scenario, "ConfigMap") if d["metadata"]["name"].endswith("-settings")
    ]
    assert len(names) == 1, names
    return names[0]


def _settings_cm(scenario: str) -> dict[str, str]:
    data: dict[str, str] = _one(scenario, "ConfigMap", _settings_cm_name(scenario))["data"]
    return data


def _components(scenario: str) -> list[str]:
    values = _values(scenario)
    return [c for c in topology.SERVICES if values[c]["enabled"]]


def _deployment(scenario: str, component: str) -> dict[str, Any]:
    found = [
        d
        for d in _objects(scenario, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{scenario}: {len(found)} Deployments for {component}"
    return found[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _mounts(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> {mount, volume} of the pod's one container."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: {"mount": m, "volume": volumes[m["name"]]} for m in _container(deployment)["volumeMounts"]}


def _env(scenario: str, component: str) -> dict[str, str]:
    """The environment of a component's container: the settings ConfigMap (envFrom) and literal env entries."""
    container = _container(_deployment(scenario, component))
    assert container["envFrom"] == [{"configMapRef": {"name": _settings_cm_name(scenario)}}]
    env = dict(_settings_cm(scenario))
    for item in container.get("env", []):
        if item["name"] in FROM_RESOURCES:  # the downward API: Kubernetes fills it in (_threads_from)
            continue
        assert "valueFrom" not in item, f"{component}: env {item['name']} from a reference"
        env[item["name"]] = item["value"]
    return env


FROM_RESOURCES = {"CRYOMAE_THREADS"}


def _threads_from(scenario: str, component: str) -> dict[str, Any] | None:
    """The resourceFieldRef that CRYOMAE_THREADS comes from (None: not set, the process reads its cgroup)."""
    container = _container(_deployment(scenario, component))
    found = [item for item in container.get("env", []) if item["name"] == "CRYOMAE_THREADS"]
    if not found:
        return None
    ref: dict[str, Any] = found[0]["valueFrom"]["resourceFieldRef"]
    return ref


def test_threads_follow_the_containers_cpu_limit_else_its_request() -> None:
    """torch sizes itself to the node's cores: the chart hands each service its CPU share (downward API, whole
    CPUs rounded up), the limit when there is one, else the request; with neither the process reads its cgroup."""
    for component in _components("defaults"):
        resources = _values("defaults")[component]["resources"]
        ref = _threads_from("defaults", component)
        if "cpu" in resources.get("limits", {}):
            expected: str | None = "limits.cpu"
        elif "cpu" in resources.get("requests", {}):
            expected = "requests.cpu"
        else:
            expected = None
        assert (ref or {}).get("resource") == expected, component
        if ref is not None:
            assert ref == {"containerName": component, "resource": expected, "divisor": "1"}

    def rendered_env(values: dict[str, Any], component: str) -> list[dict[str, Any]]:
        out = _render(values)
        docs = [d for p, text in out.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
        (deployment,) = [
            d
            for d in docs
            if d["kind"] == "Deployment"
            and d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
        ]
        env: list[dict[str, Any]] = _container(deployment)["env"]
        return env

    limited = {"trainer": {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "3500m", "memory": "8Gi"}}}}
    (item,) = [e for e in rendered_env(limited, "trainer") if e["name"] == "CRYOMAE_THREADS"]
    assert item["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    no_cpu = {"picker": {"resources": {"requests": {"cpu": None}, "limits": {"memory": "1Gi"}}}}  # null: removed
    assert all(e["name"] != "CRYOMAE_THREADS" for e in rendered_env(no_cpu, "picker"))


# ------------------------------------------------------------------------------------------ lint and schemas


@pytest.mark.parametrize("scenario", list(ALL_SCENARIOS))
def test_chart_lints_clean(scenario: str) -> None:
    s = ALL_SCENARIOS[scenario]
    report = helm_python.lint(CHART, s["values"], namespace=s["namespace"], strict=True, kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # severity 1 (info) "icon is recommended" is all there may be: no warnings (2) or errors (3)
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert {m["error"] for m in report["messages"]} <= {"icon is recommended"}


def test_chart_metadata() -> None:
    meta = _chart().metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "cryomae"
    assert meta["appVersion"] == "0.1.0"
    assert _chart().schema is not None


@pytest.mark.parametrize("scenario", list(ALL_SCENARIOS))
def test_manifests_validate_against_kubernetes_schemas(scenario: str) -> None:
    core = {"ConfigMap", "Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy", "Ingress"}
    custom = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
    docs = _rendered(scenario)[1]
    assert docs
    for doc in docs:
        assert doc["kind"] in core | custom, f"unexpected kind {doc['kind']}"
        assert doc["metadata"]["namespace"], doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]["name"]
        assert len(doc["metadata"]["name"]) <= 63
        if doc["kind"] in core:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The validator used above refuses an unknown field (so a typo in a template cannot pass)."""
    deployment = json.loads(json.dumps(_deployment("defaults", "picker")))
    _container(deployment)["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"picker": {"replicas": "two"}}, "replicas"),
        ({"picker": {"replica": 2}}, "replica"),  # misspelt key: additionalProperties false
        ({"broker": {"url": "amqp://cryomae:hunter2@rabbitmq:5672/cryomae"}}, "url"),  # a password in values
        ({"broker": {"url": "memory://"}}, "url"),  # services need RabbitMQ
        ({"picker": {"keda": {"enabled": True}}}, "existingSecret"),  # KEDA without the management API Secret
        ({"settings": {"pick": {"threshold": "sometimes"}}}, "threshold"),
        ({"settings": {"train": {"epochz": 3}}}, "epochz"),
        ({"settings": {"logLevel": "verbose"}}, "logLevel"),
        ({"persistence": {"data": {"mountPath": "data"}}}, "mountPath"),
        ({"watcher": {"gpu": 1}}, "gpu"),
        ({"networkPolicy": {"enable": True}}, "enable"),  # misspelt: the policy would silently stay on
        ({"networkPolicy": {"probeCIDRs": ["10.0.0.0"]}}, "probeCIDRs"),  # not a CIDR
        ({"networkPolicy": {"metricsFrom": [{"podSelectr": {}}]}}, "podSelectr"),
        ({"gallery": {"port": "8080"}}, "port"),  # a string, not an integer
        ({"gallery": {"port": 70000}}, "port"),
        ({"gallery": {"enable": True}}, "enable"),  # misspelt: the gallery would silently stay off
        ({"gallery": {"replicas": "one"}}, "replicas"),
        ({"gallery": {"service": {"type": "ExternalName"}}}, "type"),
        ({"gallery": {"service": {"port": "http"}}}, "port"),
        ({"gallery": {"ingress": {"enabled": "yes"}}}, "enabled"),
        ({"gallery": {"ingress": {"path": "gallery"}}}, "path"),  # not absolute
        ({"gallery": {"ingress": {"pathType": "prefix"}}}, "pathType"),
        ({"gallery": {"ingress": {"host": "https://gallery.example.org"}}}, "host"),  # a URL, not a host name
        ({"gallery": {"ingress": {"tls": [{"secretName": "gallery-tls", "host": ["a.example.org"]}]}}}, "host"),
        ({"gallery": {"ingress": {"annotations": {"example.org/replicas": 2}}}}, "annotations"),
        ({"gallery": {"networkPolicy": {"from": [{"podSelectr": {}}]}}}, "podSelectr"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], why: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=why):
        _chart().validate_schema(values)
    with pytest.raises(helm_python.HelmError):
        _render(values)


def test_schema_settings_sections_follow_the_settings_models() -> None:
    """settings.watch/pick/train accept exactly the fields of cryomae's models (the ConfigMap passes them on), except
    the device, which the chart sets per component (``picker.device``, ``trainer.device``)."""
    props = _chart().schema["properties"]["settings"]["properties"]  # type: ignore[index]
    models: dict[str, type[BaseModel]] = {"watch": WatchTuning, "pick": PickConfig, "train": TrainConfig}
    for section, model in models.items():
        assert props[section]["additionalProperties"] is False
        # device is one setting for every service (CRYOMAE_DEVICE, per component in the chart), not a section's
        assert set(props[section]["properties"]) == set(model.model_fields) - {"device"}, section
    assert Settings.model_fields["watch"].annotation is WatchTuning
    assert Settings.model_fields["pick"].annotation is PickConfig
    assert Settings.model_fields["train"].annotation is TrainConfig


# ------------------------------------------------------------------------------------------ the pods


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_service_runs_its_command_with_probes_on_the_metrics_port(scenario: str) -> None:
    port = int(_values(scenario)["metricsPort"])
    assert port == (9400 if "metricsPort" not in SCENARIOS[scenario]["values"] else 9500)
    assert _settings_cm(scenario)["CRYOMAE_METRICS_PORT"] == str(port)
    components = _components(scenario)
    assert components and set(components) <= set(topology.SERVICES)
    assert len(_objects(scenario, "Deployment")) == len(components)
    for component in components:
        container = _container(_deployment(scenario, component))
        assert container["name"] == component
        assert [*container["command"], *container["args"]] == ["cryomae", "service", component]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"metrics": port}
        expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
        for probe, path in expected.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path, (component, probe)
            assert ports.get(get["port"], get["port"]) == port, (component, probe)
        # a cold start (broker wait, model loading) gets minutes before liveness may restart the pod
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_pods_run_non_root_with_a_read_only_root_filesystem(scenario: str) -> None:
    for component in _components(scenario):
        deployment = _deployment(scenario, component)
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        # Service links would add e.g. CRYOMAE_METRICS_PORT=tcp://... for a Service named cryomae-metrics
        assert pod["enableServiceLinks"] is False
        sc = _container(deployment)["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "privileged" not in sc or sc["privileged"] is False
        tmp = _mounts(deployment)["/tmp"]
        assert "emptyDir" in tmp["volume"] and not tmp["mount"].get("readOnly", False)
        resources = _container(deployment)["resources"]
        assert resources["requests"]["memory"] and resources["limits"]["memory"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_broker_password_is_a_file_from_the_existing_secret(scenario: str, tmp_path: Path) -> None:
    values = _values(scenario)
    secrets_dir = _settings_cm(scenario)[SECRETS_DIR_ENV]
    assert secrets_dir == values["secretsDir"]
    assert _objects(scenario, "Secret") == []  # the chart never creates (so never renders) a Secret
    for component in _components(scenario):
        mount = _mounts(_deployment(scenario, component))[secrets_dir]
        assert mount["mount"]["readOnly"] is True
        secret = mount["volume"]["secret"]
        assert secret["secretName"] == values["broker"]["existingSecret"]
        assert secret["items"] == [{"key": values["broker"]["passwordKey"], "path": PASSWORD_FILE}]
        assert secret["defaultMode"] & 0o007 == 0, "the password file must not be world-readable"
        for item in _container(_deployment(scenario, component)).get("env", []):
            assert "secretKeyRef" not in json.dumps(item) and "PASSWORD" not in item["name"]
    assert urlsplit(values["broker"]["url"]).password is None
    # what the pod sees, replayed here: the secret's file in the secrets folder reaches the broker URL
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / PASSWORD_FILE).write_text("s3cret-pw")
    settings = _load(scenario, "picker", tmp_path, {SECRETS_DIR_ENV: str(folder)})
    assert settings.broker_password is not None
    assert settings.broker_password.get_secret_value() == "s3cret-pw"
    assert ":s3cret-pw@" in settings.broker_url()
    assert "s3cret-pw" not in json.dumps(settings.redacted())


def test_no_literal_secret_anywhere_in_the_output() -> None:
    """Values carry no password, so none can be rendered: the only broker credential reference is the Secret."""
    for scenario in SCENARIOS:
        out, _ = _rendered(scenario)
        text = "\n".join(out.values())
        assert "kind: Secret" not in text
        assert not re.search(r"amqps?://[^/\s\"]*:[^/\s\"]*@", text), "a broker URL with a password"


def _load(scenario: str, component: str, tmp_path: Path, override: dict[str, str] | None = None) -> Settings:
    """The settings a component's process builds from its rendered environment (cryomae.settings.load_settings)."""
    env = {**_env(scenario, component), **(override or {})}
    with pytest.MonkeyPatch.context() as mp:
        import os

        for name in list(os.environ):
            if name.startswith("CRYOMAE_"):
                mp.delenv(name)
        for name, value in env.items():
            mp.setenv(name, value)
        mp.chdir(tmp_path)  # no .env file here
        return load_settings()


def _setting_env_names() -> set[str]:
    """Every environment name pydantic-settings maps onto a Settings field: FIELD, and FIELD__SUB for sections."""
    names = set()
    for field, info in Settings.model_fields.items():
        names.add(f"CRYOMAE_{field.upper()}")
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names |= {f"CRYOMAE_{field.upper()}__{sub.upper()}" for sub in info.annotation.model_fields}
    return names


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_environment_names_are_settings_and_load_into_them(scenario: str, tmp_path: Path) -> None:
    valid = _setting_env_names() | {SECRETS_DIR_ENV}
    values = _values(scenario)
    persistence = values["persistence"]
    for component in _components(scenario):
        env = _env(scenario, component)
        used = {name for name in env if name.startswith("CRYOMAE_")}
        assert used - valid == set(), f"{component}: not settings: {sorted(used - valid)}"
        settings = _load(scenario, component, tmp_path)
        assert settings.broker.url == values["broker"]["url"]
        assert settings.broker.namespace == values["broker"]["namespace"]
        assert settings.metrics_port == values["metricsPort"]
        assert settings.metrics_host == "0.0.0.0"  # the pod network, behind the NetworkPolicy (not 127.0.0.1)
        assert str(settings.store) == persistence["store"]["mountPath"]
        assert str(settings.outputs) == persistence["outputs"]["mountPath"]
        assert str(settings.state) == persistence["state"]["mountPath"]
        assert settings.log_level == values["settings"]["logLevel"]
        assert settings.log_json is True
        assert settings.pick_workers == values["settings"].get("pickWorkers")  # null (dropped by Helm): the default
        for section in ("watch", "pick", "train"):
            for key, value in values["settings"][section].items():
                assert getattr(getattr(settings, section), key) == value, (section, key)
        gpu = values[component].get("gpu", 0)
        device = values[component].get("device") or ("cuda" if gpu else "cpu")
        assert settings.device == device
        # the folders a service uses are the ones mounted in its pod
        mounts = _mounts(_deployment(scenario, component))
        needs = {
            "watcher": {"state": False, "data": True, "store": True},  # store: to refuse a session of no project
            "picker": {"store": True, "data": True},
            "writer": {"outputs": False, "store": True, "data": True},  # store, data: to check picks messages
            "trainer": {"store": False, "data": True, "outputs": True},
        }[component]
        for volume, read_only in needs.items():
            path = persistence[volume]["mountPath"]
            assert path in mounts, (component, volume)
            assert mounts[path]["mount"]["readOnly"] is read_only, (component, volume)
        for root in settings.data_roots:
            assert root.is_absolute() and root.is_relative_to(persistence["data"]["mountPath"]), root
        assert settings.data_roots


def test_tuned_settings_reach_the_services_with_their_types(tmp_path: Path) -> None:
    settings = _load("gpu-keda-claims", "picker", tmp_path)
    assert settings.pick.threshold == 0.3 and isinstance(settings.pick.threshold, float)
    assert settings.pick.batch_size == 4096
    assert settings.train.highpass is None  # a null survives (CRYOMAE_TRAIN is JSON)
    assert settings.watch.mode == "poll" and settings.watch.poll_interval == 2.5
    assert [str(r) for r in settings.data_roots] == ["/mnt/krios"]


def test_volumes_default_to_claims_the_chart_creates_and_keeps() -> None:
    claims = {d["metadata"]["name"]: d for d in _objects("defaults", "PersistentVolumeClaim")}
    assert set(claims) == {f"cryomae-{v}" for v in ("data", "store", "outputs", "state")}
    assert claims["cryomae-state"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    for name in ("cryomae-data", "cryomae-store", "cryomae-outputs"):
        assert claims[name]["spec"]["accessModes"] == ["ReadWriteMany"]
    for claim in claims.values():
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for component in topology.SERVICES:
        for entry in _mounts(_deployment("defaults", component)).values():
            ref = entry["volume"].get("persistentVolumeClaim")
            assert ref is None or ref["claimName"] in claims


def test_existing_claims_and_inline_volumes_are_used_instead_of_new_claims() -> None:
    claims = [d["metadata"]["name"] for d in _objects("gpu-keda-claims", "PersistentVolumeClaim")]
    assert claims == ["krios-cryomae-state"]
    picker = _mounts(_deployment("gpu-keda-claims", "picker"))
    assert picker["/mnt/krios"]["volume"]["persistentVolumeClaim"] == {"claimName": "krios-data"}
    assert picker["/mnt/krios"]["mount"]["subPath"] == "epu"
    assert picker["/store"]["volume"]["persistentVolumeClaim"] == {"claimName": "cryomae-models"}
    writer = _mounts(_deployment("gpu-keda-claims", "writer"))
    assert writer["/mnt/processing/cryomae"]["volume"]["persistentVolumeClaim"] == {"claimName": "cryomae-outputs"}
    # optional-off: data from NFS, no trainer; store still needed by the pickers, outputs by the writer
    off = {d["metadata"]["name"] for d in _objects("optional-off", "PersistentVolumeClaim")}
    assert off == {"cryomae-store", "cryomae-outputs", "cryomae-state"}
    watcher = _mounts(_deployment("optional-off", "watcher"))
    assert watcher["/data"]["volume"]["nfs"] == {"server": "nas.example.org", "path": "/krios", "readOnly": True}


def test_one_watcher_replaced_with_recreate() -> None:
    for scenario in SCENARIOS:
        watcher = _deployment(scenario, "watcher")
        assert watcher["spec"]["replicas"] == 1
        assert watcher["spec"]["strategy"] == {"type": "Recreate"}


def test_gpu_pickers_request_gpus_run_cuda_and_schedule_as_configured() -> None:
    values = SCENARIOS["gpu-keda-claims"]["values"]["picker"]
    picker = _deployment("gpu-keda-claims", "picker")
    container = _container(picker)
    pod = picker["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == "8Gi"  # the defaults are kept beside the GPU
    assert container["image"] == "registry.example.org/cryomae:0.1.0-cuda"
    assert _env("gpu-keda-claims", "picker")["CRYOMAE_DEVICE"] == "cuda"
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert "replicas" not in picker["spec"]  # KEDA owns the count
    assert picker["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    trainer = _container(_deployment("gpu-keda-claims", "trainer"))
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env("gpu-keda-claims", "trainer")["CRYOMAE_DEVICE"] == "cuda:0"
    writer = _container(_deployment("gpu-keda-claims", "writer"))
    assert writer["image"] == "registry.example.org/cryomae:0.1.0"
    assert "nvidia.com/gpu" not in writer["resources"].get("limits", {})
    # defaults: CPU everywhere, no GPU requested, replicas as set
    for component in topology.SERVICES:
        default = _container(_deployment("defaults", component))
        assert "nvidia.com/gpu" not in default["resources"].get("limits", {})
        assert default["image"] == "cryomae:0.1.0"
        assert _env("defaults", component)["CRYOMAE_DEVICE"] == "cpu"
    assert _deployment("defaults", "picker")["spec"]["replicas"] == 1
    five = _render({"picker": {"replicas": 5}})["cryomae/templates/deployments.yaml"]
    pickers = [d for d in yaml.safe_load_all(five) if d and d["metadata"]["name"] == "cryomae-picker"]
    assert pickers[0]["spec"]["replicas"] == 5


# ------------------------------------------------------------------------------------------ config rollout


def _checksums(out: dict[str, str]) -> set[str]:
    docs = [d for d in yaml.safe_load_all(out["cryomae/templates/deployments.yaml"]) if d]
    return {d["spec"]["template"]["metadata"]["annotations"]["checksum/config"] for d in docs}


def test_config_checksum_is_the_configmaps_and_changes_with_it() -> None:
    base = _render({})
    sums = _checksums(base)
    assert sums == {hashlib.sha256(base["cryomae/templates/configmap.yaml"].encode()).hexdigest()}
    for change in (
        {"settings": {"logLevel": "debug"}},
        {"settings": {"pick": {"threshold": 0.4}}},
        {"broker": {"url": "amqp://cryomae@rabbitmq-2:5672/cryomae"}},
    ):
        changed = _checksums(_render(change))
        assert len(changed) == 1 and changed != sums, change
    # a change outside the ConfigMap does not roll every pod
    assert _checksums(_render({"picker": {"replicas": 4}})) == sums


# ------------------------------------------------------------------------------------------ monitoring


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_component_has_a_metrics_service_for_its_pods(scenario: str) -> None:
    services = _objects(scenario, "Service")
    assert len(services) == len(_components(scenario))
    port = _values(scenario)["metricsPort"]
    for component in _components(scenario):
        pod_labels = _deployment(scenario, component)["spec"]["template"]["metadata"]["labels"]
        found = [s for s in services if _matches(s["spec"]["selector"], pod_labels)]
        assert len(found) == 1, component
        assert found[0]["spec"]["ports"] == [
            {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
        ]


SERVICE_MONITOR_SPEC = {"jobLabel", "namespaceSelector", "selector", "endpoints", "targetLabels", "podTargetLabels"}
SERVICE_MONITOR_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings", "scheme"}
RELABEL = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}
DURATION = re.compile(r"([0-9]+(ms|s|m|h))+")


def _check_service_monitor(sm: dict[str, Any]) -> None:
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) <= SERVICE_MONITOR_SPEC
    assert set(sm["spec"]["selector"]) == {"matchLabels"}
    assert all(isinstance(v, str) for v in sm["spec"]["selector"]["matchLabels"].values())
    assert set(sm["spec"]["namespaceSelector"]) == {"matchNames"}
    for endpoint in sm["spec"]["endpoints"]:
        assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT
        assert isinstance(endpoint["port"], str)
        assert DURATION.fullmatch(endpoint["interval"]) and DURATION.fullmatch(endpoint["scrapeTimeout"])
        for rule in endpoint.get("relabelings", []):
            assert set(rule) <= RELABEL and "targetLabel" in rule
            assert all(re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", label) for label in rule.get("sourceLabels", []))


def test_service_monitor_scrapes_every_service_as_the_compose_jobs() -> None:
    for scenario in ("defaults", "gpu-keda-claims", "custom-names"):
        monitors = {d["metadata"]["name"]: d for d in _objects(scenario, "ServiceMonitor")}
        full = _fullname(scenario)
        sm = monitors[full]
        _check_service_monitor(sm)
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [SCENARIOS[scenario]["namespace"]]
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
        selected = [
            s
            for s in _objects(scenario, "Service")
            if _matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(selected) == len(_components(scenario))
        jobs = set()
        for service in selected:
            assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
            jobs.add(service["metadata"]["labels"][sm["spec"]["jobLabel"]])
        assert jobs == {f"cryomae-{c}" for c in _components(scenario)}
        # the same job names as the compose install's scrape configuration, which the alert rules assume
        compose = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
        assert jobs <= {job["job_name"] for job in compose["scrape_configs"]}
        assert all(re.fullmatch(".*cryomae.*", job) for job in jobs)
    sm = _one("gpu-keda-claims", "ServiceMonitor", "krios-cryomae")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rabbit = _one("gpu-keda-claims", "ServiceMonitor", "krios-cryomae-rabbitmq")
    _check_service_monitor(rabbit)
    assert rabbit["spec"]["namespaceSelector"]["matchNames"] == ["rabbitmq"]
    assert rabbit["spec"]["endpoints"][0]["path"] == "/metrics/per-object"  # per-queue series
    assert {"targetLabel": "job", "replacement": "rabbitmq"} in rabbit["spec"]["endpoints"][0]["relabelings"]
    assert [d["metadata"]["name"] for d in _objects("defaults", "ServiceMonitor")] == ["cryomae"]


def test_prometheus_rule_carries_the_alert_rules_of_deploy() -> None:
    assert (CHART / "files" / "alerts.yaml").read_bytes() == ALERTS.read_bytes(), (
        "helm/cryomae/files/alerts.yaml differs from deploy/prometheus/alerts.yaml: copy it over"
    )
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for scenario in ("defaults", "gpu-keda-claims", "custom-names"):
        rule = _one(scenario, "PrometheusRule")
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(rule["spec"]) == {"groups"}
        assert rule["spec"]["groups"] == groups
        for group in rule["spec"]["groups"]:
            assert set(group) <= {"name", "interval", "rules", "limit"} and group["rules"]
            for r in group["rules"]:
                assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
                assert ("alert" in r) != ("record" in r) and isinstance(r["expr"], str)
                assert all(isinstance(v, str) for v in {**r.get("labels", {}), **r.get("annotations", {})}.values())
    assert _one("gpu-keda-claims", "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboards_are_configmaps_for_the_grafana_sidecar() -> None:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files
    shipped = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert [f.name for f in shipped] == [f.name for f in files], "copy deploy/grafana/dashboards/*.json to files/"
    for source, copy in zip(files, shipped, strict=True):
        assert copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}: copy it over"
    for scenario, namespace in (("defaults", "default"), ("gpu-keda-claims", "monitoring")):
        maps = [d for d in _objects(scenario, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard")]
        assert len(maps) == len(files)
        by_key = {key: (cm, text) for cm in maps for key, text in cm["data"].items()}
        assert set(by_key) == {f.name for f in files}
        for f in files:
            cm, text = by_key[f.name]
            assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
            assert cm["metadata"]["namespace"] == namespace
            assert json.loads(text) == json.loads(f.read_text())
    # switched off as a whole, or one by one
    assert [d for d in _objects("optional-off", "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]] == []
    excluded = SCENARIOS["custom-names"]["values"]["dashboards"]["exclude"]
    keys = {k for d in _objects("custom-names", "ConfigMap") for k in d["data"]}
    assert not keys & set(excluded)


def test_keda_scales_pickers_on_the_micrographs_queue() -> None:
    values = SCENARIOS["gpu-keda-claims"]["values"]["picker"]["keda"]
    scaled = _one("gpu-keda-claims", "ScaledObject")
    auth = _one("gpu-keda-claims", "TriggerAuthentication")
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef", "pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount", "triggers",
        "advanced", "fallback", "idleReplicaCount", "initialCooldownPeriod",
    }  # fmt: skip
    picker = _deployment("gpu-keda-claims", "picker")
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": picker["metadata"]["name"]}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (values["minReplicas"], values["maxReplicas"])
    assert [t["type"] for t in spec["triggers"]] == ["rabbitmq"]
    trigger = spec["triggers"][0]
    assert set(trigger) <= {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
    metadata = trigger["metadata"]
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA trigger metadata are strings"
    namespace = SCENARIOS["gpu-keda-claims"]["values"].get("broker", {}).get("namespace", "cryomae")
    assert metadata["queueName"] == f"{namespace}.{topology.MICROGRAPHS}" == "cryomae.micrographs"
    assert metadata["protocol"] == "http"  # the management API, not AMQP
    assert metadata["mode"] == "QueueLength" and metadata["value"] == str(values["queueLength"])
    assert metadata["vhostName"] == values["vhost"]
    assert "host" not in metadata  # credentials only through the TriggerAuthentication
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["spec"] == {
        "secretTargetRef": [
            {"parameter": "host", "name": values["auth"]["existingSecret"], "key": values["auth"]["hostKey"]}
        ]
    }
    # the queue name follows the broker namespace
    custom = _render(
        {
            "broker": {"namespace": "titan-krios"},
            "picker": {"keda": {"enabled": True, "auth": {"existingSecret": "mgmt"}}},
        }
    )
    docs = [d for d in yaml.safe_load_all(custom["cryomae/templates/keda.yaml"]) if d]
    queue = next(d for d in docs if d["kind"] == "ScaledObject")["spec"]["triggers"][0]["metadata"]["queueName"]
    assert queue == f"titan-krios.{topology.MICROGRAPHS}"
    for scenario in ("defaults", "optional-off", "custom-names"):
        assert _objects(scenario, "ScaledObject") == _objects(scenario, "TriggerAuthentication") == []
        assert "replicas" in _deployment(scenario, "picker")["spec"]


def test_optional_parts_switch_off() -> None:
    kinds = {d["kind"] for d in _rendered("optional-off")[1]}
    assert kinds == {"ConfigMap", "Deployment", "Service", "PersistentVolumeClaim"}
    assert len(_objects("optional-off", "ConfigMap")) == 1  # the settings only, no dashboards
    assert _components("optional-off") == ["writer", "picker", "watcher"]


# ------------------------------------------------------------------------------------------ NetworkPolicy


def _policy(scenario: str) -> dict[str, Any]:
    return _one(scenario, "NetworkPolicy")


@pytest.mark.parametrize("scenario", ["defaults", "gpu-keda-claims", "custom-names"])
def test_network_policy_admits_only_the_scrapers_to_the_metrics_port(scenario: str) -> None:
    """Item 17: the pods listen on 0.0.0.0 (no authentication; project names and model versions in /metrics), so
    a NetworkPolicy (on by default) refuses every ingress but the metrics port from the configured scrapers (and
    the probes' node ranges); egress is left alone (the broker may be anywhere)."""
    values = _values(scenario)
    policy = _policy(scenario)
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["metadata"]["namespace"] == SCENARIOS[scenario]["namespace"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    # it selects every cryomae pod of this release, and nothing else
    selector = spec["podSelector"]["matchLabels"]
    for component in _components(scenario):
        assert _matches(selector, _deployment(scenario, component)["spec"]["template"]["metadata"]["labels"])
    assert selector["app.kubernetes.io/instance"] == SCENARIOS[scenario]["release"]
    assert not _matches(selector, {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/instance": "x"})
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": values["metricsPort"], "protocol": "TCP"}]
    peers = values["networkPolicy"]["metricsFrom"] + [
        {"ipBlock": {"cidr": cidr}} for cidr in values["networkPolicy"]["probeCIDRs"]
    ]
    assert rule["from"] == peers and peers  # a rule without peers would admit everyone
    if scenario == "defaults":  # Prometheus pods (kube-prometheus-stack's label) in any namespace
        assert rule["from"] == [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
        ]


def test_network_policy_without_scrapers_refuses_all_ingress_and_switches_off() -> None:
    # no peers: no ingress rule at all (deny), never a rule without "from" (which would admit every source)
    out = _render({"networkPolicy": {"metricsFrom": [], "probeCIDRs": []}})
    (policy,) = [d for d in yaml.safe_load_all(out["cryomae/templates/networkpolicy.yaml"]) if d]
    assert policy["spec"]["policyTypes"] == ["Ingress"] and policy["spec"]["ingress"] == []
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)
    assert _objects("optional-off", "NetworkPolicy") == []
    assert _settings_cm("optional-off")["CRYOMAE_METRICS_HOST"] == "0.0.0.0"  # the pods still serve the probes


# ------------------------------------------------------------------------------------------ NOTES


def test_notes_show_how_to_watch_and_run_the_cli_in_the_trainer_pod() -> None:
    for scenario in ("defaults", "custom-names"):
        notes = _rendered(scenario)[0]["cryomae/templates/NOTES.txt"]
        trainer = _deployment(scenario, "trainer")["metadata"]["name"]
        namespace = SCENARIOS[scenario]["namespace"]
        assert f"kubectl -n {namespace} exec -i deploy/{trainer} -- cryomae" in notes
        assert f"get pods -l app.kubernetes.io/instance={SCENARIOS[scenario]['release']}" in notes
        picker_service = [
            s
            for s in _objects(scenario, "Service")
            if s["metadata"]["labels"]["app.kubernetes.io/component"] == "picker"
        ]
        assert f"svc/{picker_service[0]['metadata']['name']}" in notes
        # every CLI command the notes show is one the cryomae CLI accepts
        commands = [line.strip() for line in notes.splitlines() if re.match(r"\s+cryomae [a-z]", line)]
        assert len(commands) >= 4
        parser = cli.build_parser()
        for command in commands:
            parser.parse_args(command.split()[1:])
        data_root = _values(scenario)["persistence"]["data"]["mountPath"]
        assert f"--folder {data_root}/" in notes


# ------------------------------------------------------------------------------------------ session gallery

GALLERY_PAGE = "/<project>/<session>/gallery/index.html"  # where the writer's pages lie under the outputs folder


def _component_of(doc: dict[str, Any]) -> str | None:
    component: str | None = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")
    return component


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _serve_options(container: dict[str, Any]) -> dict[str, str]:
    """The options of `cryomae gallery serve --name value ...` as {--name: value}."""
    argv = [*container["command"], *container["args"]]
    assert argv[:3] == ["cryomae", "gallery", "serve"], argv
    options = argv[3:]
    assert len(options) % 2 == 0 and all(o.startswith("--") for o in options[::2]), argv
    return dict(zip(options[::2], options[1::2], strict=True))


def test_gallery_is_off_by_default() -> None:
    assert _values("defaults")["gallery"]["enabled"] is False
    for scenario in SCENARIOS:
        out, docs = _rendered(scenario)
        assert out["cryomae/templates/gallery.yaml"].strip() == ""
        assert [d["metadata"]["name"] for d in docs if _component_of(d) == "gallery"] == []
        assert _objects(scenario, "Ingress") == []
        assert "gallery" not in out["cryomae/templates/NOTES.txt"].lower()


def test_enabling_the_gallery_adds_its_objects_and_changes_no_other() -> None:
    def others(scenario: str) -> list[str]:
        return sorted(json.dumps(d, sort_keys=True) for d in _rendered(scenario)[1] if _component_of(d) != "gallery")

    assert others("gallery") == others("defaults")
    added = sorted((d["kind"], d["metadata"]["name"]) for d in _rendered("gallery")[1] if _component_of(d) == "gallery")
    assert added == [
        ("Deployment", "cryomae-gallery"),
        ("NetworkPolicy", "cryomae-gallery"),
        ("Service", "cryomae-gallery"),
    ]
    with_ingress = {d["kind"] for d in _rendered("gallery-ingress")[1] if _component_of(d) == "gallery"}
    assert with_ingress == {"Deployment", "Service", "Ingress", "NetworkPolicy"}


@pytest.mark.parametrize("scenario", list(GALLERY_SCENARIOS))
def test_gallery_serves_the_outputs_read_only(scenario: str, tmp_path: Path) -> None:
    values = _values(scenario)
    gallery = values["gallery"]
    outputs = values["persistence"]["outputs"]
    deployment = _deployment(scenario, "gallery")
    assert deployment["metadata"]["name"] == f"{_fullname(scenario)}-gallery"
    assert deployment["spec"]["replicas"] == gallery["replicas"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], _pod_labels(deployment))
    container = _container(deployment)
    assert container["name"] == "gallery"
    # `cryomae gallery serve` on the outputs folder, listening on the pod network at gallery.port
    assert _serve_options(container) == {
        "--outputs": outputs["mountPath"],
        "--host": "0.0.0.0",
        "--port": str(gallery["port"]),
    }
    args = cli.build_parser().parse_args(container["args"])  # what the cryomae CLI makes of them
    assert args.func is cli.cmd_gallery_serve
    assert (args.host, args.port, args.outputs) == ("0.0.0.0", gallery["port"], Path(outputs["mountPath"]))
    assert args.project is None and args.session is None  # every session under the outputs folder
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": gallery["port"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert ports.get(get["port"], get["port"]) == gallery["port"], probe
    # the same image as the services, the CPU one even where the pickers run the CUDA image
    assert container["image"] == _container(_deployment(scenario, "watcher"))["image"]
    assert not container["image"].endswith("-cuda")
    resources = container["resources"]
    assert resources == gallery["resources"] and resources["limits"]["memory"]
    # the outputs volume (the writer's) read-only, a small /tmp, nothing else: no data, no store, no broker Secret
    mounts = _mounts(deployment)
    assert set(mounts) == {"/tmp", outputs["mountPath"]}
    out = mounts[outputs["mountPath"]]
    assert out["mount"]["readOnly"] is True
    assert out["mount"].get("subPath", "") == outputs["subPath"]
    claim = outputs["existingClaim"] or f"{_fullname(scenario)}-outputs"
    assert out["volume"] == {"name": "outputs", "persistentVolumeClaim": {"claimName": claim}}
    if "writer" in _components(scenario):
        writer = _mounts(_deployment(scenario, "writer"))[outputs["mountPath"]]
        assert writer["volume"] == out["volume"] and writer["mount"]["readOnly"] is False
        assert writer["mount"].get("subPath") == out["mount"].get("subPath")
    tmp = mounts["/tmp"]
    assert "emptyDir" in tmp["volume"] and not tmp["mount"].get("readOnly", False)
    assert "secret" not in json.dumps(deployment["spec"]["template"]["spec"]["volumes"]).lower()
    # non-root with a read-only root filesystem, no privilege escalation, no capabilities, RuntimeDefault seccomp
    pod = deployment["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0 and psc["fsGroup"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    # the same user and group as the other pods, which write the files it reads
    assert psc == _deployment(scenario, "picker")["spec"]["template"]["spec"]["securityContext"]
    assert (psc["runAsUser"], psc["fsGroup"]) == (10001, 10001)
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc or sc["privileged"] is False
    # the services' settings (CRYOMAE_OUTPUTS among them): real settings, the path it mounts and serves, and the
    # config checksum that rolls the other pods
    env = _env(scenario, "gallery")
    assert {n for n in env if n.startswith("CRYOMAE_")} <= _setting_env_names() | {SECRETS_DIR_ENV}
    assert not [n for n in env if "PASSWORD" in n]
    settings = _load(scenario, "gallery", tmp_path)
    assert str(settings.outputs) == outputs["mountPath"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert {annotations["checksum/config"]} == _checksums(_rendered(scenario)[0])
    # scheduling and pod metadata from gallery.*
    assert pod.get("nodeSelector", {}) == gallery["nodeSelector"]
    assert gallery["podAnnotations"].items() <= annotations.items()
    assert gallery["podLabels"].items() <= _pod_labels(deployment).items()


@pytest.mark.parametrize("scenario", list(GALLERY_SCENARIOS))
def test_gallery_service_selects_the_gallery_pods_only(scenario: str) -> None:
    values = _values(scenario)["gallery"]
    service = _one(scenario, "Service", f"{_fullname(scenario)}-gallery")
    spec = service["spec"]
    assert spec["type"] == values["service"]["type"]
    assert spec["ports"] == [
        {"name": "http", "port": values["service"]["port"], "targetPort": "http", "protocol": "TCP"}
    ]
    assert "http" in {p["name"] for p in _container(_deployment(scenario, "gallery"))["ports"]}
    gallery_pods = _pod_labels(_deployment(scenario, "gallery"))
    assert _matches(spec["selector"], gallery_pods)
    for component in _components(scenario):
        assert not _matches(spec["selector"], _pod_labels(_deployment(scenario, component))), component
    # and the metrics Services do not select the gallery pods
    for other in _objects(scenario, "Service"):
        if other is not service:
            assert not _matches(other["spec"]["selector"], gallery_pods), other["metadata"]["name"]
    # no metrics label: the ServiceMonitor (jobs cryomae-<service>) leaves it out
    assert "cryomae.io/metrics" not in service["metadata"]["labels"]
    for monitor in _objects(scenario, "ServiceMonitor"):
        assert not _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])


def test_gallery_ingress_routes_to_the_gallery_service() -> None:
    for scenario in ("gallery", "gallery-only"):
        assert _objects(scenario, "Ingress") == []
    values = _values("gallery-ingress")["gallery"]["ingress"]
    ingress = _one("gallery-ingress", "Ingress")
    service = _one("gallery-ingress", "Service", "krios-cryomae-gallery")
    assert ingress["metadata"]["name"] == service["metadata"]["name"]
    assert ingress["metadata"]["namespace"] == service["metadata"]["namespace"] == "cryoem"
    assert ingress["metadata"]["annotations"] == values["annotations"]
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == values["tls"]
    (rule,) = spec["rules"]
    assert rule["host"] == values["host"]
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert backend["port"] == {"name": port["name"]}
    # the Service's target is the port the server listens on
    container = _container(_deployment("gallery-ingress", "gallery"))
    target = {p["name"]: p["containerPort"] for p in container["ports"]}[port["targetPort"]]
    assert str(target) == _serve_options(container)["--port"] == "8081"
    # the defaults: the cluster's default class, any host, no TLS, the root path
    out = _render({"gallery": {"enabled": True, "ingress": {"enabled": True}}})
    (plain,) = [d for d in yaml.safe_load_all(out["cryomae/templates/gallery.yaml"]) if d and d["kind"] == "Ingress"]
    assert set(plain["spec"]) == {"rules"} and "annotations" not in plain["metadata"]
    (rule,) = plain["spec"]["rules"]
    assert "host" not in rule
    assert rule["http"]["paths"] == [
        {
            "path": "/",
            "pathType": "Prefix",
            "backend": {"service": {"name": "cryomae-gallery", "port": {"name": "http"}}},
        }
    ]
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(plain, version, strict=True)


def test_gallery_network_policy_admits_its_peers_to_the_gallery_port_only() -> None:
    """The release's NetworkPolicy selects the gallery pods as well (admitting the metrics port, on which nothing
    listens there); a second policy admits gallery.networkPolicy.from to the gallery port, nothing else."""
    assert _values("gallery")["gallery"]["networkPolicy"]["from"] == [{"namespaceSelector": {}}]
    for scenario in ("gallery", "gallery-ingress"):
        values = _values(scenario)
        full = _fullname(scenario)
        gallery_pods = _pod_labels(_deployment(scenario, "gallery"))
        release_policy = _one(scenario, "NetworkPolicy", full)
        assert _matches(release_policy["spec"]["podSelector"]["matchLabels"], gallery_pods)
        policy = _one(scenario, "NetworkPolicy", f"{full}-gallery")
        spec = policy["spec"]
        assert _matches(spec["podSelector"]["matchLabels"], gallery_pods)
        for component in _components(scenario):
            assert not _matches(spec["podSelector"]["matchLabels"], _pod_labels(_deployment(scenario, component)))
        assert spec["policyTypes"] == ["Ingress"]
        (rule,) = spec["ingress"]
        assert rule["ports"] == [{"port": values["gallery"]["port"], "protocol": "TCP"}]
        assert rule["from"] == values["gallery"]["networkPolicy"]["from"] and rule["from"]
    # an empty list refuses everyone: no rule at all, never one without peers (which would admit every source)
    out = _render({"gallery": {"enabled": True, "networkPolicy": {"from": []}}})
    (policy,) = [
        d for d in yaml.safe_load_all(out["cryomae/templates/gallery.yaml"]) if d and d["kind"] == "NetworkPolicy"
    ]
    assert policy["spec"]["ingress"] == []
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)
    assert _objects("gallery-only", "NetworkPolicy") == []


def test_gallery_alone_still_gets_the_outputs_claim() -> None:
    claims = {d["metadata"]["name"] for d in _objects("gallery-only", "PersistentVolumeClaim")}
    assert "cryomae-outputs" in claims
    assert _components("gallery-only") == ["picker", "watcher"]
    mount = _mounts(_deployment("gallery-only", "gallery"))["/outputs"]
    assert mount["volume"]["persistentVolumeClaim"] == {"claimName": "cryomae-outputs"}
    # without the gallery (and the writer and the trainer) no outputs claim is made
    out = _render({"writer": {"enabled": False}, "trainer": {"enabled": False}})
    assert "cryomae-outputs" not in out["cryomae/templates/pvcs.yaml"]
    # an existing outputs claim is used, never a new one
    claims = {d["metadata"]["name"] for d in _objects("gallery-ingress", "PersistentVolumeClaim")}
    assert claims == {"krios-cryomae-data", "krios-cryomae-store", "krios-cryomae-state"}


def test_notes_show_where_the_gallery_is() -> None:
    notes = _rendered("gallery")[0]["cryomae/templates/NOTES.txt"]
    assert "kubectl -n default port-forward svc/cryomae-gallery 8080:8080" in notes
    assert f"http://localhost:8080{GALLERY_PAGE}" in notes
    notes = _rendered("gallery-ingress")[0]["cryomae/templates/NOTES.txt"]
    assert f"https://gallery.krios.example.org{GALLERY_PAGE}" in notes
    assert "port-forward svc/krios-cryomae-gallery" not in notes


# ------------------------------------------------------------------------------------------ memory


FOOTPRINT = ROOT / "docs" / "footprint.json"  # tests/benchmarks/footprint.py
MEASURED_AS = {
    "watcher": "cryomae service watcher",
    "writer": "cryomae service writer",
    "gallery": "cryomae gallery serve",
    "picker": "cryomae service picker",
    "trainer": "cryomae service trainer",
}
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _bytes(quantity: str) -> float:
    """A Kubernetes memory quantity (``104Mi``, ``2Gi``, or plain bytes) in bytes."""
    unit = quantity[-2:]
    return float(quantity[:-2]) * _UNITS[unit] if unit in _UNITS else float(quantity)


def test_memory_requests_follow_the_measured_footprint() -> None:
    """Each service's memory request covers its measured resident memory with headroom, and a service that never
    loads torch does not reserve a torch-sized share; the writer's limit covers drawing a large micrograph."""
    footprint = json.loads(FOOTPRINT.read_text(encoding="utf-8"))
    values = _values("defaults")
    for component, name in MEASURED_AS.items():
        rss = footprint["services"][name]["rss"]["median"]
        resources = values[component]["resources"]
        request, limit = _bytes(resources["requests"]["memory"]), _bytes(resources["limits"]["memory"])
        assert 1.25 * rss <= request <= limit, (component, rss, resources)
        if component in ("watcher", "writer", "gallery"):
            assert request <= 2 * rss, (component, rss, resources)
    drawing = footprint["drawing"]["maxrss"]["max"]
    assert _bytes(values["writer"]["resources"]["limits"]["memory"]) >= 1.5 * drawing
