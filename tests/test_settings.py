"""Settings: the declarative table, every malformed value, and the README's table."""

from __future__ import annotations

import re

import pytest

from victor_mp_metrics import ConfigurationError, load_deployment_settings, load_settings
from victor_mp_metrics.settings import (
    SETTINGS,
    DeploymentSettings,
    Settings,
    settings_table_markdown,
)

from ._gunicorn import ROOT

BAD_VALUES = {
    "VICTOR_METRICS_ENABLED": ["maybe", "2", "tru", "enabled"],
    "VICTOR_METRICS_PORT": ["0", "65536", "-1", "http", "80.5", "9090x"],
    "VICTOR_METRICS_ADDR": ["   ", "not a host!", "::zz::"],
    "PROMETHEUS_MULTIPROC_DIR": ["   ", "a\x00b"],
    "VICTOR_METRICS_AUTH_TOKEN": [" padded ", "\t"],
    "VICTOR_METRICS_AUTH_TOKEN_FILE": ["/nonexistent/token", "/"],
    "VICTOR_METRICS_WEB_CONFIG": ["/nonexistent/web.yml", "/"],
    "VICTOR_METRICS_BASIC_AUTH": ["nocolon", ":password", "user:"],
    "VICTOR_METRICS_MAX_SERIES": ["0", "-5", "many", "1000001"],
    "VICTOR_METRICS_SWEEP_INTERVAL": ["-1", "soon", "inf", "nan"],
    "VICTOR_BIND": ["8000", ":8000", "host:port", "127.0.0.1:0", "127.0.0.1:70000"],
    "VICTOR_WORKERS": ["0", "four", "1025"],
    "VICTOR_WORKER_CLASS": ["tornado", "SYNC", "uvicorn"],
    "VICTOR_THREADS": ["0", "257", "x"],
    "VICTOR_TIMEOUT": ["0", "3601", "30s"],
    "VICTOR_MAX_REQUESTS": ["-1", "lots"],
    "VICTOR_MAX_REQUESTS_JITTER": ["-1", "1.5"],
}


def test_every_setting_has_bad_value_cases():
    """The table-driven test below covers every row of the settings table."""
    assert {s.env for s in SETTINGS} == set(BAD_VALUES)


def _load(env: str, value: str) -> Settings | DeploymentSettings:
    """Load the section ``env`` belongs to."""
    section = next(s for s in SETTINGS if s.env == env).section
    return load_settings({env: value}) if section == "library" else load_deployment_settings(
        {env: value}
    )


@pytest.mark.parametrize(
    ("env", "value"), [(env, value) for env, values in BAD_VALUES.items() for value in values]
)
def test_malformed_value_names_variable_value_and_what_is_accepted(env: str, value: str):
    """A bad value raises ConfigurationError naming the variable, the value and the fix."""
    with pytest.raises(ConfigurationError) as caught:
        _load(env, value)
    message = str(caught.value)
    assert message.startswith(f"{env}=")
    assert "expected" in message and f"unset {env}" in message
    secret = next(s for s in SETTINGS if s.env == env).secret
    if secret:
        assert value not in message and "<hidden>" in message
    else:
        assert repr(value) in message


@pytest.mark.parametrize(
    ("env", "value", "field", "expected"),
    [
        ("VICTOR_METRICS_ENABLED", "off", "enabled", False),
        ("VICTOR_METRICS_ENABLED", " YES ", "enabled", True),
        ("VICTOR_METRICS_PORT", "9100", "port", 9100),
        ("VICTOR_METRICS_SWEEP_INTERVAL", "0", "sweep_interval", 0.0),
        ("VICTOR_BIND", "unix:/run/victor.sock", "bind", "unix:/run/victor.sock"),
        ("VICTOR_WORKER_CLASS", "gthread", "worker_class", "gthread"),
        ("VICTOR_METRICS_ENABLED", "", "enabled", True),
    ],
)
def test_good_values_parse(env: str, value: str, field: str, expected):
    """Accepted spellings parse to typed values; an empty variable counts as unset."""
    assert expected == getattr(_load(env, value), field)


def test_defaults_match_the_settings_object():
    """The table's defaults and the two settings dataclasses agree, section by section."""
    for setting in SETTINGS:
        defaults = Settings() if setting.section == "library" else DeploymentSettings()
        assert setting.default == getattr(defaults, setting.name), setting.env


def test_a_bad_deployment_value_never_breaks_the_library(monkeypatch, tmp_path):
    """VICTOR_TIMEOUT=abc & co. are gunicorn.conf.py's business: metrics still record."""
    from victor_mp_metrics import MetricsCollector, _runtime

    for env, value in (("VICTOR_TIMEOUT", "abc"), ("VICTOR_WORKERS", "many"),
                       ("VICTOR_BIND", "nowhere")):
        monkeypatch.setenv(env, value)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "m"))
    MetricsCollector().tool_calls.increment()
    assert 1.0 == MetricsCollector().get_summary()["tool_calls"]
    assert _runtime.get_settings().multiprocess
    with pytest.raises(ConfigurationError, match="VICTOR_"):
        load_deployment_settings()


def test_unknown_override_is_refused():
    """A typo in an override names the known settings."""
    with pytest.raises(ConfigurationError, match="unknown setting"):
        load_settings({}, prot=9090)


def test_settings_are_not_read_at_import_time():
    """Importing the package reads no environment: a bad value only fails on use."""
    import subprocess
    import sys

    code = "import victor_mp_metrics, prometheus_client; print('imported')"
    env = {"VICTOR_METRICS_PORT": "nope", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "imported\n" == proc.stdout, proc.stderr


def _readme_section(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker}:start -->\n(.*?)<!-- {marker}:end -->", text, re.S)
    assert match, f"README.md lacks the {marker} markers"
    return match.group(1)


def test_readme_settings_table_is_current():
    """README's configuration table is exactly the one generated from the settings table."""
    assert settings_table_markdown() == _readme_section("settings-table")


def test_readme_catalog_table_is_current():
    """README's metric catalog table is exactly the one generated from the catalog."""
    from victor_mp_metrics.catalog import catalog_table_markdown

    assert catalog_table_markdown() == _readme_section("catalog-table")
