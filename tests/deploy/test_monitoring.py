"""The monitoring artefacts under ``deploy/``: the Grafana dashboard, its provisioning, the Prometheus alert rules
and scrape configuration. Checked with Prometheus's own ``promtool`` (rules, unit tests, config, and every
dashboard expression parsed as PromQL) and against the metrics the code really exports: every metric a panel or
an alert queries must be one of ``cryomae.service.metrics`` (with the right histogram and counter suffixes and only
the labels it has), or a named RabbitMQ / DCGM exporter metric, or Prometheus's ``up``."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cryomae.operator import actions as ops
from cryomae.service import metrics
from cryomae.service.app import App, serve
from cryomae.settings import Settings
from tests.live.conftest import PROJECT, SESSION, Live, control_for, make_dataset, wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yaml"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
SERVICES = ("watcher", "picker", "writer", "trainer")

# RabbitMQ's rabbitmq_prometheus plugin, per-object endpoint (/metrics/per-object; the /metrics/detailed endpoint
# names the same metrics rabbitmq_detailed_*): the per-queue metrics, checked against the plugin of RabbitMQ 3.10.
RABBITMQ_QUEUE_METRICS = frozenset(
    {
        "rabbitmq_queue_messages",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
        "rabbitmq_queue_messages_bytes",
        "rabbitmq_queue_messages_ready_bytes",
        "rabbitmq_queue_messages_unacked_bytes",
        "rabbitmq_queue_messages_published_total",
        "rabbitmq_queue_consumers",
        "rabbitmq_queue_process_memory_bytes",
    }
)
RABBITMQ_LABELS = frozenset({"vhost", "queue", "job", "instance"})
# NVIDIA DCGM exporter's default GPU fields
DCGM_METRICS = frozenset(
    {
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_SM_CLOCK",
    }
)
TARGET_LABELS = frozenset({"job", "instance", "service"})  # added by Prometheus (and prometheus.yml) to every series
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"})


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing (Debian's prometheus package; scripts/test.sh installs it)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# what the code exports


def _constructors() -> dict[str, tuple[str, tuple[str, ...], bool]]:
    """Metrics constructed in cryomae/service/metrics.py: name -> (type, label names, registered at import time)."""
    tree = ast.parse(Path(metrics.__file__).read_text())
    at_import = {
        id(node)
        for stmt in tree.body
        for node in ast.walk(stmt)
        if not isinstance(stmt, ast.FunctionDef | ast.ClassDef)
    }
    found = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("Counter", "Gauge", "Histogram", "Summary", "Info", "Enum")
        ):
            name = node.args[0]
            assert isinstance(name, ast.Constant) and isinstance(name.value, str), ast.dump(node)
            labels: tuple[str, ...] = ()
            label_node = (
                node.args[2]
                if len(node.args) > 2
                else next((k.value for k in node.keywords if k.arg == "labelnames"), None)
            )
            if label_node is not None:
                labels = tuple(ast.literal_eval(label_node))
            found[name.value] = (node.func.id.lower(), labels, id(node) in at_import)
    return found


def _sample_names(family: str, kind: str) -> set[str]:
    base = family.removesuffix("_total") if kind == "counter" else family
    return {
        "counter": {base + "_total", base + "_created"},
        "gauge": {base},
        "histogram": {base + s for s in ("_bucket", "_sum", "_count", "_created")},
        "summary": {base, base + "_sum", base + "_count", base + "_created"},
        "info": {base + "_info"},
    }.get(kind, {base})


def exported() -> dict[str, frozenset[str]]:
    """Every sample name the services export, with the labels its series carry (besides the target labels)."""
    out: dict[str, frozenset[str]] = {}
    for family in prometheus_client.REGISTRY.collect():
        for name in _sample_names(family.name, family.type):
            out[name] = frozenset(label for s in family.samples if s.name == name for label in s.labels)
    # label names from the code (a labelled metric without children has no samples yet), and the metrics that
    # are only registered on a GPU machine (cryomae_gpu_memory_*_bytes)
    for constructed, (kind, labels, _) in _constructors().items():
        for name in _sample_names(constructed, kind):
            extra = {"le"} if name.endswith("_bucket") else set()
            out[name] = frozenset(labels) | extra
    return out


def test_the_metric_list_comes_from_the_registry_and_the_code() -> None:
    """The two sources agree: what metrics.py constructs at import is exactly what the registry holds."""
    constructed = _constructors()
    registered = {f.name: f.type for f in prometheus_client.REGISTRY.collect() if f.name.startswith("cryomae_")}
    at_import = {n.removesuffix("_total") if k == "counter" else n: k for n, (k, _, now) in constructed.items() if now}
    assert at_import == registered
    gpu_only = {n for n, (_, _, now) in constructed.items() if not now}
    assert gpu_only == {"cryomae_gpu_memory_used_bytes", "cryomae_gpu_memory_reserved_bytes"}
    names = exported()
    assert names["cryomae_micrographs_picked_total"] == {"project"}
    assert names["cryomae_end_to_end_latency_seconds_bucket"] == {"le"}
    assert "cryomae_end_to_end_latency_seconds" not in names  # a histogram has no bare series


# ---------------------------------------------------------------------------------------------------------------
# a PromQL metric-name extractor

PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "atan2",
        "inf",
        "nan",
    }
)
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_TOKENS = re.compile(
    rf"""(?P<string>{_STRING})
    |(?P<var>\$\{{[^}}]*\}}|\$\w+|\[\[\w+\]\])
    |(?P<braces>\{{(?:[^}}"'`]|{_STRING})*\}})
    |(?P<range>\[[^\]]*\])
    |(?P<number>(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)[a-zA-Z]*)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<space>\s+)
    |(?P<other>.)""",
    re.X | re.S,
)
_MATCHER = re.compile(rf"\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*({_STRING})\s*,?")


def selectors(expr: str) -> list[tuple[str, frozenset[str]]]:
    """The series selectors of a PromQL expression: (metric name, label names its matchers use). Function and
    aggregation names, keywords, label lists (``by (le)``), strings, numbers, durations and Grafana variables are
    not metric names."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKENS.finditer(expr) if m.lastgroup != "space"]
    out: list[tuple[str, frozenset[str]]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text in LABEL_LIST_KEYWORDS and nxt[1] == "(":
            i = next(j for j in range(i + 1, len(tokens)) if tokens[j][1] == ")") + 1  # skip the label list
            continue
        # a name followed by "(" is a function or an aggregation, as is one followed by "by (...)"/"without (...)"
        if (
            kind == "ident"
            and text.lower() not in PROMQL_KEYWORDS
            and nxt[1] != "("
            and nxt[1] not in ("by", "without")
        ):
            labels = _matchers(nxt[1])[0] if nxt[0] == "braces" else set()
            out.append((text, frozenset(labels)))
        elif kind == "braces" and (i == 0 or tokens[i - 1][0] != "ident"):
            labels, name = _matchers(text)
            assert name, f"a selector without a metric name in {expr!r}"
            out.append((name, frozenset(labels) - {"__name__"}))
        i += 1
    return out


def _matchers(braces: str) -> tuple[set[str], str | None]:
    """The label names of ``{...}`` matchers, and the metric name of a ``__name__="..."`` matcher."""
    body = braces[1:-1]
    labels, name, pos = set(), None, 0
    while body[pos:].strip():
        m = _MATCHER.match(body, pos)
        assert m, f"cannot parse label matchers {braces!r}"
        labels.add(m.group(1))
        if m.group(1) == "__name__" and m.group(2) == "=":
            name = m.group(3)[1:-1]
        pos = m.end()
    return labels, name


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(cryomae_x_bucket{a="b"}[5m]))', {"cryomae_x_bucket"}),
        ("histogram_quantile(0.95, sum(rate(h_bucket[$__rate_interval])) by (le, queue))", {"h_bucket"}),
        ("a / on(project) group_left(version) b", {"a", "b"}),
        ("x offset 10m unless ignoring (instance) y > bool 5", {"x", "y"}),
        ('{__name__="foo", job="x"} or vector(0)', {"foo"}),
        ("count(up == 0) or topk(3, m) and on() vector(1)", {"up", "m"}),
        ("1e3 * m - 0x1F + .5 + Inf + nan", {"m"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ('sum without (instance) (m{q=~"a{1,2}", r!="}"})', {"m"}),
        ("rate(m[5m:1m]) + deriv(n[1h30m])", {"m", "n"}),
        ('max by (queue) (rabbitmq_queue_messages{queue=~"$namespace[.].+[.]dlq"})', {"rabbitmq_queue_messages"}),
        ('sum(increase(m{project=~"$project"}[$__range])) * ${factor}', {"m"}),
    ],
)
def test_the_extractor_finds_exactly_the_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_extractor_sees_matcher_labels() -> None:
    assert selectors('rate(m{project=~"$project", le="+Inf"}[5m]) / n') == [
        ("m", frozenset({"project", "le"})),
        ("n", frozenset()),
    ]


def unknown_metrics(expr: str, names: dict[str, frozenset[str]]) -> list[str]:
    """What is wrong with the selectors of ``expr``: unknown metrics and matchers on labels a metric lacks."""
    problems = []
    found = selectors(expr)
    if not found:
        problems.append("queries no metric")
    for name, labels in found:
        if name in names:
            allowed = names[name]
        elif name in RABBITMQ_QUEUE_METRICS:
            allowed = RABBITMQ_LABELS
        elif name in DCGM_METRICS:
            continue
        elif name == "up":
            allowed = frozenset()
        else:
            problems.append(f"{name} is neither exported by cryomae nor a known RabbitMQ/DCGM/Prometheus metric")
            continue
        if extra := labels - allowed - TARGET_LABELS:
            problems.append(f"{name} has no label(s) {sorted(extra)}")
    return problems


def test_the_checker_rejects_wrong_names_and_labels() -> None:
    names = exported()
    assert unknown_metrics("rate(cryomae_micrographs_picked_total[5m])", names) == []
    assert unknown_metrics("histogram_quantile(0.5, rate(cryomae_end_to_end_latency_seconds[5m]))", names)
    assert unknown_metrics("cryomae_micrographs_picked", names)  # a counter without _total
    assert unknown_metrics("rabbitmq_queue_message_ready", names)
    assert unknown_metrics('cryomae_end_to_end_latency_seconds_bucket{project="a"}', names) == [
        "cryomae_end_to_end_latency_seconds_bucket has no label(s) ['project']"
    ]
    assert unknown_metrics("vector(1)", names) == ["queries no metric"]


# ---------------------------------------------------------------------------------------------------------------
# the dashboard


def load_dashboard(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, list[str]]]:
    """(where, PromQL, labels it shows) of every panel target and query variable: the labels of the legend
    (``{{project}}``), of a table's grouping, or a variable's label."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            labels = re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", ""))
            if target.get("format") == "table":
                m = re.match(r"\s*\w+ by \(([^)]*)\)", target["expr"])
                labels = [label.strip() for label in m.group(1).split(",")] if m else []
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"], labels
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
            assert m, f"variable {var['name']}: unexpected query {query!r}"
            yield f"variable {var['name']}", m.group(1), [m.group(2)]


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    for where, expr, _ in queries(dashboard):
        yield where, expr


def substitute(expr: str) -> str:
    """An expression with Grafana's variables replaced: intervals by 5m, others by a regex matching all."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: "5m" if m.group(1) in GRAFANA_BUILTINS else ".*", expr)


def test_there_is_a_facility_dashboard() -> None:
    titles = [load_dashboard(p)["title"] for p in DASHBOARDS]
    assert "cryomae facility" in titles
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dash = load_dashboard(path)
    assert dash["uid"] and len(dash["uid"]) <= 40 and dash["schemaVersion"] >= 36  # Grafana 10 writes 38/39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["project"]["includeAll"] and variables["project"]["multi"]
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dash):
        assert panel.get("title", "").strip(), f"panel {panel['id']} has no title"
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == datasource, f"{panel['title']!r} does not use the datasource variable"
        assert panel.get("description"), f"{panel['title']!r} has no description"
        targets = panel.get("targets", [])
        assert targets, f"{panel['title']!r} queries nothing"
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target.get("datasource") == datasource and target["expr"].strip(), panel["title"]
    # every variable an expression uses is defined (or one of Grafana's own)
    for where, expr in expressions(dash):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in variables or name in GRAFANA_BUILTINS, f"{where}: ${name} is not a variable"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_metric_is_exported(path: Path) -> None:
    names = exported()
    problems = [
        f"{where}: {problem}"
        for where, expr in expressions(load_dashboard(path))
        for problem in unknown_metrics(expr, names)
    ]
    assert problems == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_expression_is_valid_promql(path: Path, tmp_path: Path) -> None:
    """promtool parses each expression (Grafana's variables replaced by values), as a recording rule."""
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(expressions(load_dashboard(path)))
    ]
    rule_file = tmp_path / "dashboard_rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = promtool("check", "rules", str(rule_file))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(rules)} rules found" in check.stdout


@pytest.fixture
def scraped(tmp_path: Path) -> str:
    """/metrics of a real ``cryomae run`` process (in-memory broker) after a session picked 3 micrographs."""
    source = tmp_path / "source"
    source.mkdir()
    data = make_dataset(source, 3)
    live = Live(tmp_path / "live", "memory", f"test-{uuid.uuid4().hex[:12]}", data)
    live.create_project()
    app = App(live.settings(metrics_port=0))
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(app, stop), kwargs={"check_every_s": 0.2})
    thread.start()
    try:
        wait_until(lambda: app.health is not None, 30, "the HTTP endpoint")
        control = control_for(live, app.broker)
        live.session_folder.mkdir(parents=True)
        ops.session_start(app.settings, control, PROJECT, SESSION, live.session_folder, "*.mrc", True)
        exemplars = live.dataset.exemplars(live.root / "ex.star")
        ops.exemplars_add(app.settings, control, PROJECT, data.micrographs[0], exemplars, None)
        for i in range(3):
            live.drop(i)
        wait_until(lambda: live.picked() == 3, what="3 micrographs picked")
        assert app.health is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{app.health.port}/metrics", timeout=5) as response:
            return response.read().decode()
    finally:
        stop.set()
        thread.join(60)


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


def test_the_dashboard_panels_show_data_from_a_live_session(scraped: str, tmp_path: Path) -> None:
    """Every panel query on cryomae's own metrics returns series, with the labels its legend or table shows,
    given the metrics of a real process that picked a session: label names and values in the queries are the
    ones the code uses. (RabbitMQ, DCGM and `up` series do not come from cryomae; GPU gauges only on a GPU.)"""
    samples = [
        s
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
        if not s.name.endswith("_created")
    ]
    present = {s.name for s in samples}
    target = {"job": "cryomae", "instance": "cryomae:9400"}
    input_series = [
        {"series": _series(s.name, {**s.labels, **target}), "values": " ".join([repr(s.value)] * 4)} for s in samples
    ]
    rules, skipped = [], []
    dash = next(load_dashboard(p) for p in DASHBOARDS if load_dashboard(p)["title"] == "cryomae facility")
    for where, expr, labels in queries(dash):
        names = metric_names(expr)
        if not names <= present:
            skipped.append(where)
            continue
        shown = f"count by ({', '.join(labels)}) ({substitute(expr)})" if labels else substitute(expr)
        for label in labels:  # keep the series where the label is set (vector(1) has it empty)
            shown = f"({shown}) unless on ({label}) vector(1)"
        rules.append({"alert": f"{where} shows nothing", "expr": f"absent({shown})"})
    assert len(rules) >= 25
    assert all(
        re.search(r"GPU|Services up|Dead letters|queue depth|Consumers|variable namespace", w) for w in skipped
    ), skipped
    # the check itself: a query on a project that does not exist shows nothing
    rules.append({"alert": "control", "expr": 'absent(cryomae_micrographs_picked_total{project="nope"})'})
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    cases: list[dict[str, Any]] = [{"eval_time": "3m", "alertname": r["alert"], "exp_alerts": []} for r in rules[:-1]]
    cases.append({"eval_time": "3m", "alertname": "control", "exp_alerts": [{"exp_labels": {"project": "nope"}}]})
    (tmp_path / "test.yaml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yaml"],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": cases}],
            }
        )
    )
    run = promtool("test", "rules", str(tmp_path / "test.yaml"))
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_facility_dashboard_shows_what_the_issue_asks_for() -> None:
    dash = next(load_dashboard(p) for p in DASHBOARDS if load_dashboard(p)["title"] == "cryomae facility")
    used = set().union(*(metric_names(expr) for _, expr in expressions(dash)))
    assert {
        "cryomae_micrographs_picked_total",  # throughput
        "cryomae_end_to_end_latency_seconds_bucket",  # latency percentiles
        "cryomae_pick_duration_seconds_bucket",
        "cryomae_particles_per_micrograph_bucket",
        "cryomae_micrographs_failed_total",
        "cryomae_messages_dead_lettered_total",
        "cryomae_queue_wait_seconds_bucket",
        "rabbitmq_queue_messages_ready",  # work queue depth from RabbitMQ
        "rabbitmq_queue_messages",  # dead-letter queue depth
        "cryomae_model_version_info",
        "cryomae_training_progress_ratio",
        "cryomae_training_loss",
        "cryomae_gpu_memory_used_bytes",
        "DCGM_FI_DEV_GPU_UTIL",
        "up",
    } <= used
    exprs = [expr for _, expr in expressions(dash)]
    assert any("histogram_quantile(0.99" in e and "cryomae_end_to_end_latency_seconds_bucket" in e for e in exprs)
    assert any("rabbitmq_queue_messages{" in e and "[.]dlq" in e for e in exprs)
    version_table = [p for p in panels(dash) if "cryomae_model_version_info" in str(p.get("targets"))]
    assert [p["type"] for p in version_table] == ["table"]
    assert version_table[0]["targets"][0]["format"] == "table"


def test_grafana_provisioning_for_compose() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    for path in DASHBOARDS:  # the dashboards' datasource variable defaults to the provisioned datasource
        (var,) = [v for v in load_dashboard(path)["templating"]["list"] if v["name"] == "datasource"]
        assert var["current"]["value"] == source["uid"]
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cryomae.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/var/lib/grafana/dashboards")


# ---------------------------------------------------------------------------------------------------------------
# the alert rules


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules() -> None:
    check = promtool("check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout


def test_promtool_unit_tests_of_the_alerts() -> None:
    run = promtool("test", "rules", str(ALERTS_TEST))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_has_cases_that_fire_and_cases_that_do_not() -> None:
    cases = [c for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for c in t["alert_rule_test"]]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: no case where it stays quiet"


def test_the_alerts_the_issue_asks_for() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert {
        "CryomaeServiceDown",
        "CryomaeBacklogGrowing",
        "CryomaeDeadLetters",
        "CryomaeDeadLetterQueueNotEmpty",
        "CryomaeNoPicks",
        "CryomaeLatencyHigh",
        "CryomaeTrainingFailed",
    } <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
    # the objectives are in the expressions and said in the descriptions
    latency = rules["CryomaeLatencyHigh"]
    assert "histogram_quantile(0.95" in latency["expr"] and latency["expr"].rstrip().endswith("> 60")
    assert "60 s objective" in latency["annotations"]["description"] and latency["for"] == "10m"
    no_picks = rules["CryomaeNoPicks"]
    assert no_picks["expr"].count("[15m]") == 3 and "N = 15 minutes" in no_picks["annotations"]["description"]
    backlog = rules["CryomaeBacklogGrowing"]
    assert "> 100" in backlog["expr"] and "[15m]" in backlog["expr"]
    assert "more than 100" in backlog["annotations"]["description"]


def test_every_alert_metric_is_exported() -> None:
    names = exported()
    problems = [f"{r['alert']}: {p}" for r in alert_rules() for p in unknown_metrics(r["expr"], names)]
    assert problems == []


# ---------------------------------------------------------------------------------------------------------------
# the scrape configuration


def test_promtool_check_config() -> None:
    # rule_files are relative to the configuration file: alerts.yaml must sit next to it
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [ALERTS.name]
    check = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 rule files found" in check.stdout


def _job_regex(alert: str) -> re.Pattern[str]:
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    m = re.search(r'up\{job=~"([^"]+)"\}', rule["expr"])
    assert m, rule["expr"]
    return re.compile(m.group(1))


def test_scrape_jobs_match_the_services_and_the_alerts() -> None:
    jobs = {j["job_name"]: j for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    port = Settings.model_fields["metrics_port"].default
    assert port == 9400
    service_down, broker_down = _job_regex("CryomaeServiceDown"), _job_regex("CryomaeBrokerDown")
    for service in SERVICES:
        (job,) = [
            j
            for j in jobs.values()
            if any(t == f"{service}:{port}" for c in j.get("static_configs", []) for t in c["targets"])
            or any(c["names"] == [service] and c["port"] == port for c in j.get("dns_sd_configs", []))
        ]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert service_down.fullmatch(job["job_name"]) and not broker_down.fullmatch(job["job_name"])
    rabbit = jobs["rabbitmq"]
    assert rabbit["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    # per-queue series named rabbitmq_queue_* (what the dashboard and alerts query) come from /metrics/per-object
    assert rabbit["metrics_path"] == "/metrics/per-object"
    assert broker_down.fullmatch("rabbitmq") and not service_down.fullmatch("rabbitmq")
