"""Static Prometheus and Grafana assets in examples/observability, checked with promtool.

Nothing here starts Prometheus: configurations go through ``promtool check config``, rule
files through ``promtool check rules`` and their unit tests through ``promtool test
rules``. Every PromQL expression of the Grafana dashboard is parsed by promtool as a
recording rule, after Grafana's variables are replaced by sample values.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from victor_mp_metrics.catalog import CATALOG as LIBRARY_CATALOG

from ._tools import require_tool

ASSETS = Path(__file__).resolve().parent.parent / "examples" / "observability"
DASHBOARD = ASSETS / "grafana_dashboard.json"
ALERTING_RULES = ASSETS / "alerting_rules.yml"
RECORDING_RULES = ASSETS / "recording_rules.yml"
RULE_FILES = (ALERTING_RULES, RECORDING_RULES)
RULE_TESTS = (ASSETS / "alerting_rules_test.yml", ASSETS / "recording_rules_test.yml")
CONFIGS = sorted(ASSETS.glob("prometheus*.yml"))
KUBERNETES_CONFIG = ASSETS / "prometheus-kubernetes.yml"

# Every metric family the app exposes: name -> (type, labels). Histograms are queried
# as name_bucket. The library's catalog (the guide's tables) plus the self-metrics.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{spec.name: (spec.kind, spec.labels) for spec in LIBRARY_CATALOG},
    "victor_metrics_scrape_duration_seconds": ("gauge", ()),
    "victor_metrics_files_read": ("gauge", ()),
    "victor_metrics_bytes_read": ("gauge", ()),
    "victor_metrics_compactions_total": ("counter", ()),
    "victor_metrics_compaction_seconds_total": ("counter", ()),
    "victor_metrics_writers_compacted_total": ("counter", ()),
    "victor_metrics_corrupt_files_total": ("counter", ()),
    "victor_metrics_write_errors_total": ("counter", ()),
    "victor_metrics_hook_errors_total": ("counter", ()),
    "victor_metrics_series_overflow_total": ("counter", ("metric",)),
}
# Families that must have a dashboard panel: the whole catalog and three self-metrics.
DASHBOARD_FAMILIES = {spec.name for spec in LIBRARY_CATALOG} | {
    "victor_metrics_scrape_duration_seconds",
    "victor_metrics_compactions_total",
    "victor_metrics_corrupt_files_total",
}
TARGET_LABELS = ("job", "instance")

# The guide's four alerts keep its `for` and severity.
GUIDE_ALERTS = {
    "HighErrorRate": ("5m", "warning"),
    "HighLatency": ("5m", "warning"),
    "LLMRateLimiting": ("2m", "critical"),
    "LowCacheHitRate": ("10m", "info"),
}

# Sample values for Grafana's variables, so that promtool can parse the expressions.
GRAFANA_VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "job": "victor",
    "instance": ".+",
}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"\b(?:victor|gunicorn)_[a-z0-9_]+\b")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\{([^{}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")

pytestmark = pytest.mark.prometheus


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n{result.stdout}{result.stderr}"
    )


def _load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the rule files")
    return yaml.safe_load(path.read_text())


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of the dashboard, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found.extend((inner, target) for target in inner.get("targets", []))
    return found


def _substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def _metric_names(expr: str) -> set[str]:
    """victor_* names that the expression selects (label values in quotes do not count)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def _family(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        base = name.removesuffix(suffix)
        if base != name and FAMILIES.get(base, ("",))[0] == "histogram":
            return base
    return name


def _labels_of(name: str) -> set[str]:
    """Labels a series of ``name`` can carry once scraped (target labels included)."""
    if name == "up":
        return set(TARGET_LABELS)
    family = _family(name)
    extra = {"le"} if name.endswith("_bucket") and family != name else set()
    # An unknown name is reported by the tests that check names.
    return set(FAMILIES.get(family, ("", ()))[1]) | set(TARGET_LABELS) | extra


def _unknown_labels(expr: str) -> list[str]:
    """Label names in matchers and by() clauses that the selected metrics do not have."""
    plain = _STRING.sub('""', expr)
    problems = []
    for name, matchers in _SELECTOR.findall(plain):
        if name:
            problems += [
                f"{name}{{{label}}}"
                for label in _MATCHER.findall(matchers)
                if label not in _labels_of(name)
            ]
    known = set().union(*(_labels_of(n) for n in _metric_names(expr)), TARGET_LABELS)
    for clause in _BY.findall(plain):
        labels = {label.strip() for label in clause.split(",")}
        problems += [f"by ({label})" for label in sorted(labels - known)]
    return problems


def _rule_exprs() -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule in both rule files."""
    rules = []
    for path in RULE_FILES:
        for group in _load_yaml(path)["groups"]:
            for rule in group["rules"]:
                rules.append((rule.get("alert") or rule["record"], rule["expr"]))
    return rules


def _promtool_has_kubernetes_sd(promtool: str, workdir: Path) -> bool:
    """False for builds without Kubernetes discovery, such as Debian's."""
    probe = workdir / "kubernetes-probe.yml"
    probe.write_text(
        "scrape_configs:\n  - job_name: probe\n    kubernetes_sd_configs:\n      - role: pod\n"
    )
    result = _run([promtool, "check", "config", str(probe)])
    return "kubernetes_sd_configs not found" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def promtool() -> str:
    """Path of promtool; skipped (or failed under CI) when it is not installed."""
    return require_tool("promtool", "Debian/Ubuntu: apt-get install prometheus")


def test_require_tool_returns_the_path_of_a_present_tool(tmp_path: Path) -> None:
    """require_tool returns the full path of an executable found on PATH."""
    tool = tmp_path / "fake-promtool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", str(tmp_path))
        assert str(tool) == require_tool("fake-promtool")


@pytest.mark.parametrize(
    ("ci", "outcome"), [("", pytest.skip.Exception), ("true", pytest.fail.Exception)]
)
def test_require_tool_skips_or_fails_under_ci(
    tmp_path: Path, ci: str, outcome: type[BaseException]
) -> None:
    """A missing tool skips the test, or fails it when CI is set."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", str(tmp_path))
        mp.setenv("CI", ci)
        with pytest.raises(outcome, match="no-such-tool"):
            require_tool("no-such-tool", "apt-get install no-such-tool")


def test_every_expected_config_exists() -> None:
    """The single-target, file_sd, Kubernetes and federation configurations are all there."""
    expected = {
        "prometheus.yml",
        "prometheus-scale-out.yml",
        "prometheus-kubernetes.yml",
        "prometheus-federation.yml",
    }
    assert expected <= {path.name for path in CONFIGS}
    assert (ASSETS / "file_sd_targets.json").is_file()


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_config_passes_promtool_check_config(
    promtool: str, config: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """promtool check config accepts the file, with its rule files and file_sd targets."""
    if "kubernetes_sd_configs" in config.read_text() and not _promtool_has_kubernetes_sd(
        promtool, tmp_path_factory.mktemp("probe")
    ):
        pytest.skip(
            f"{promtool} was built without Kubernetes discovery (Debian removes it); "
            "test_kubernetes_config_passes_with_static_targets checks the rest of the file"
        )
    _assert_ok(_run([promtool, "check", "config", str(config)]))


def test_kubernetes_config_passes_with_static_targets(promtool: str, tmp_path: Path) -> None:
    """The Kubernetes config, its discovery block swapped for static targets, passes promtool.

    This checks the relabelling and everything else of the file with any promtool build,
    including Debian's, which cannot parse kubernetes_sd_configs.
    """
    lines = KUBERNETES_CONFIG.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "kubernetes_sd_configs:")
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
    ):
        end += 1
    pad = " " * indent
    lines[start:end] = [f"{pad}static_configs:", f"{pad}  - targets: ['10.0.0.1:8000']"]
    config = tmp_path / KUBERNETES_CONFIG.name
    config.write_text("\n".join(lines) + "\n")
    for rule_file in RULE_FILES:
        (tmp_path / rule_file.name).write_text(rule_file.read_text())
    _assert_ok(_run([promtool, "check", "config", str(config)]))


def test_rule_files_pass_promtool_check_rules(promtool: str) -> None:
    """promtool check rules accepts the alerting and recording rules."""
    _assert_ok(_run([promtool, "check", "rules", *map(str, RULE_FILES)]))


@pytest.mark.parametrize("tests", RULE_TESTS, ids=[path.name for path in RULE_TESTS])
def test_rule_unit_tests_pass(promtool: str, tests: Path) -> None:
    """promtool test rules passes every unit test of the rule files."""
    _assert_ok(_run([promtool, "test", "rules", str(tests)]))


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a unit test where it fires and one where it must stay quiet."""
    alerts = {name for name, _ in _rule_exprs() if name[0].isupper()}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _load_yaml(ASSETS / "alerting_rules_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set() == alerts - firing, "alerts without a firing test"
    assert set() == alerts - quiet, "alerts without a test that they stay quiet"


def test_guide_alerts_keep_for_and_severity() -> None:
    """The guide's four alerts exist with the guide's `for` duration and severity label."""
    rules = {
        rule["alert"]: rule
        for group in _load_yaml(ALERTING_RULES)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    actual = {
        name: (rules[name].get("for"), rules[name]["labels"]["severity"])
        for name in GUIDE_ALERTS
        if name in rules
    }
    assert GUIDE_ALERTS == actual
    for name, rule in rules.items():
        assert {"summary", "description"} <= set(rule["annotations"]), name


def test_every_recording_rule_is_tested_and_well_named() -> None:
    """Each recorded series has a promql_expr_test and a level:metric:operations name."""
    records = {name for name, _ in _rule_exprs() if ":" in name}
    assert "job:victor:request_rate:5m" in records
    tested = {
        check["expr"].strip()
        for case in _load_yaml(ASSETS / "recording_rules_test.yml")["tests"]
        for check in case.get("promql_expr_test", [])
    }
    assert set() == records - tested, "recording rules without a promql_expr_test"
    badly_named = [name for name in records if not re.fullmatch(r"job(_[a-z]+)*:victor:\S+", name)]
    assert [] == badly_named


def test_federation_pulls_every_recorded_series() -> None:
    """The federation match[] and remote_write keep regex select every recorded series."""
    config = _load_yaml(ASSETS / "prometheus-federation.yml")
    (job,) = config["scrape_configs"]
    (name_matcher,) = [m for m in job["params"]["match[]"] if m.startswith("{__name__=~")]
    regex = re.fullmatch(r'\{__name__=~"(.+)"\}', name_matcher)
    assert regex is not None, name_matcher
    federated = re.compile(regex.group(1))
    (remote,) = config["remote_write"]
    (keep,) = remote["write_relabel_configs"]
    kept = re.compile(keep["regex"])
    records = [name for name, _ in _rule_exprs() if ":" in name]
    assert [] == [name for name in records if not federated.fullmatch(name)]
    assert [] == [name for name in records if not kept.fullmatch(name)]


def test_rules_use_only_exposed_metrics_and_labels() -> None:
    """Every victor_* name and label in the rule files is one that the app exposes."""
    unknown = {
        (rule, name)
        for rule, expr in _rule_exprs()
        for name in _metric_names(expr)
        if _family(name) not in FAMILIES
    }
    assert set() == unknown
    bad_labels = {rule: _unknown_labels(expr) for rule, expr in _rule_exprs()}
    assert {} == {rule: labels for rule, labels in bad_labels.items() if labels}


def test_quantiles_aggregate_buckets_by_le() -> None:
    """Every histogram_quantile, in rules and dashboard, sums bucket rates by le first."""
    exprs = [expr for _, expr in _rule_exprs()]
    exprs += [target["expr"] for _, target in _targets(_dashboard())]
    quantile = re.compile(r"histogram_quantile\(\s*[\d.]+\s*,\s*sum by \(([^)]*)\)", re.S)
    for expr in exprs:
        calls = expr.count("histogram_quantile(")
        aggregated = [m for m in quantile.findall(expr) if "le" in re.split(r"[,\s]+", m)]
        assert calls == len(aggregated), expr


def test_dashboard_is_importable_json() -> None:
    """The dashboard is JSON with a title, uid, modern schema and no deprecated graph panels."""
    dashboard = _dashboard()
    assert dashboard["title"] == "Victor AI Metrics"
    assert dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    types = {panel["type"] for panel in dashboard["panels"]}
    assert "graph" not in types
    assert "timeseries" in types


def test_dashboard_has_datasource_job_and_instance_variables() -> None:
    """$datasource picks a Prometheus source; $job and $instance are multi-value with All."""
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert ("datasource", "prometheus") == (
        variables["datasource"]["type"],
        variables["datasource"]["query"],
    )
    expected = {
        "job": "label_values(victor_requests_total, job)",
        "instance": 'label_values(victor_requests_total{job=~"$job"}, instance)',
    }
    for name, query in expected.items():
        variable = variables[name]
        actual = variable["query"]
        actual = actual["query"] if isinstance(actual, dict) else actual
        assert (query, "query", True, True) == (
            actual,
            variable["type"],
            variable["multi"],
            variable["includeAll"],
        )
        assert variable["datasource"]["uid"] == "${datasource}"


def test_dashboard_targets_use_datasource_and_filters() -> None:
    """Every query uses ${datasource} and each selector filters on $job and $instance."""
    for panel, target in _targets(_dashboard()):
        where = f"panel {panel['title']!r} target {target['refId']}"
        assert target["datasource"]["uid"] == "${datasource}", where
        assert panel["datasource"]["uid"] == "${datasource}", where
        expr = target["expr"]
        selectors = [matchers for _, matchers in _SELECTOR.findall(expr)]
        assert selectors, where
        for selector in selectors:
            assert 'job=~"$job"' in selector, f"{where}: {{{selector}}}"
            assert 'instance=~"$instance"' in selector, f"{where}: {{{selector}}}"
        bare = re.findall(
            r"\b(?:(?:victor|gunicorn)_[a-z0-9_]+|up)\b(?!\{)", _STRING.sub('""', expr)
        )
        assert [] == bare, f"{where}: selectors without the $job/$instance filters"


def test_dashboard_legends_name_labels_the_query_keeps() -> None:
    """A legend's {{label}} is one of the labels the query aggregates by."""
    for panel, target in _targets(_dashboard()):
        kept = {
            label.strip() for clause in _BY.findall(target["expr"]) for label in clause.split(",")
        }
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        if kept:
            assert set() == legend - kept, f"panel {panel['title']!r}"


def test_dashboard_exprs_parse_with_promtool(promtool: str, tmp_path: Path) -> None:
    """promtool parses every dashboard query, written as a recording rule."""
    rules = [
        {
            "record": f"dashboard:panel_{panel['id']}:{target['refId']}",
            "expr": _substitute(target["expr"]),
        }
        for panel, target in _targets(_dashboard())
    ]
    assert rules
    rule_file = tmp_path / "dashboard_rules.yml"
    # JSON is YAML, so no YAML writer is needed.
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    _assert_ok(_run([promtool, "check", "rules", str(rule_file)]))


def test_dashboard_shows_every_catalog_family() -> None:
    """Each catalog family and self-metric appears in a panel; no panel queries unknown ones."""
    shown = {
        _family(name)
        for _, target in _targets(_dashboard())
        for name in _metric_names(target["expr"])
    }
    assert set() == DASHBOARD_FAMILIES - shown, "families without a panel"
    assert set() == shown - set(FAMILIES), "names that the app does not expose"


def test_dashboard_queries_use_only_exposed_labels() -> None:
    """Every label a panel filters or aggregates by exists on the metrics it queries."""
    bad = {
        f"{panel['title']} {target['refId']}": _unknown_labels(target["expr"])
        for panel, target in _targets(_dashboard())
    }
    assert {} == {where: labels for where, labels in bad.items() if labels}


def test_dashboard_keeps_the_guide_panels() -> None:
    """The guide's Request Rate, Request Latency (p95) and Error Rate panels are there."""
    titles = {panel["title"] for panel in _dashboard()["panels"]}
    assert {"Request Rate", "Request Latency (p95)", "Error Rate"} <= titles


def test_latency_panels_show_exemplars() -> None:
    """Every latency (histogram bucket) query of the dashboard has exemplars turned on, so
    a slow request links to its trace."""
    import json

    dashboard = json.loads((ASSETS / "grafana_dashboard.json").read_text())
    targets = [t for panel in dashboard["panels"] for t in panel.get("targets", [])
               if "victor_" in t.get("expr", "") and "_bucket" in t.get("expr", "")]
    assert len(targets) >= 3  # request, LLM and tool latency, at least
    assert all(t.get("exemplar") is True for t in targets)
