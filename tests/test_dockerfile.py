"""Static checks of the Dockerfile and .dockerignore: hadolint, then the image's contract.

No Docker engine is needed: the Dockerfile is parsed here, never built.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from victor_mp_metrics.settings import SETTINGS, load_deployment_settings, load_settings

from ._tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
METRICS_DIR = "/run/victor-metrics"
GUNICORN_CMD = ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON argument list of an exec-form instruction (CMD, VOLUME, ...)."""
        assert self.args.startswith("["), f"line {self.line}: {self.keyword} is not exec form"
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: expected a JSON array"
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split ``text`` into instructions the way Docker does for the subset used here."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        # Docker drops comment and blank lines, also in the middle of a continuation.
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(parts).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, f"line {start}: the last instruction ends with a continuation"
    return instructions


def _all(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def _last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = _all(instructions, keyword)
    assert found, f"the Dockerfile has no {keyword} instruction"
    return found[-1]


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in _all(instructions, "ENV"):
        tokens = shlex.split(instruction.args)
        if "=" not in tokens[0]:  # legacy form: ENV KEY value with spaces
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        for token in tokens:
            key, _, value = token.partition("=")
            env[key] = value
    return env


def _copy_sources_and_dest(instruction: Instruction) -> tuple[list[str], str]:
    if instruction.args.startswith("["):
        args = instruction.exec_form()
    else:
        args = [a for a in shlex.split(instruction.args) if not a.startswith("--")]
    return args[:-1], args[-1]


def _healthcheck_argv(instructions: list[Instruction]) -> list[str]:
    healthcheck = _last(instructions, "HEALTHCHECK")
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(\[.*\])", healthcheck.args)
    assert match, f"HEALTHCHECK must use exec form CMD [...], got: {healthcheck.args}"
    return Instruction("CMD", match.group(1), healthcheck.line).exec_form()


def _user_uid(instructions: list[Instruction]) -> str:
    return _last(instructions, "USER").args.partition(":")[0]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_hadolint_reports_no_findings() -> None:
    """hadolint exits 0 and reports nothing, style-level findings included."""
    hadolint = require_tool("hadolint", "pip install -e '.[test]'")
    # HADOLINT_* variables (ignore lists, thresholds) from the caller must not mask findings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    proc = subprocess.run(
        [
            hadolint,
            "--no-color",
            "--failure-threshold",
            "style",
            "--format",
            "json",
            str(DOCKERFILE),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    findings = [
        f"line {f['line']}: {f['code']} {f['level']}: {f['message']}"
        for f in json.loads(proc.stdout or "[]")
    ]
    assert findings == []
    assert proc.returncode == 0, proc.stderr


def test_base_image_is_pinned_python_311_slim(instructions: list[Instruction]) -> None:
    """The single stage builds FROM the official python:3.11-slim image, never :latest."""
    froms = _all(instructions, "FROM")
    assert [f.args.split()[0].partition("@")[0] for f in froms] == ["python:3.11-slim"]


def test_project_is_pip_installed_from_build_context(instructions: list[Instruction]) -> None:
    """A RUN pip-installs the project itself (.) without keeping pip's cache."""
    runs = [r.args for r in _all(instructions, "RUN")]
    assert any(re.search(r"pip install --no-cache-dir \.(\s|$)", r) for r in runs), runs


def test_copies_exactly_what_the_install_needs(instructions: list[Instruction]) -> None:
    """COPY brings in the metadata, the library, the app and gunicorn.conf.py, nothing else."""
    sources = {
        src.rstrip("/")
        for copy in _all(instructions, "COPY")
        for src in _copy_sources_and_dest(copy)[0]
    }
    expected = {"pyproject.toml", "README.md", "gunicorn.conf.py", "victor_mp_metrics", "app"}
    assert expected == sources


def test_runs_as_numeric_non_root_user(instructions: list[Instruction]) -> None:
    """The final USER is a numeric non-zero UID, the one useradd creates."""
    uid = _user_uid(instructions)
    assert uid.isdigit(), f"USER should be numeric so runAsNonRoot can verify it, got {uid}"
    assert int(uid) != 0
    created = [
        m.group(1)
        for r in _all(instructions, "RUN")
        if (m := re.search(r"useradd\b.*--uid (\d+)", r.args))
    ]
    assert [uid] == created


def test_cmd_runs_gunicorn_with_project_config(instructions: list[Instruction]) -> None:
    """CMD is exactly gunicorn -c gunicorn.conf.py app:app, in exec form."""
    assert _last(instructions, "CMD").exec_form() == GUNICORN_CMD
    assert not _all(instructions, "ENTRYPOINT")


def test_workdir_holds_gunicorn_conf(instructions: list[Instruction]) -> None:
    """gunicorn.conf.py is copied into the final WORKDIR, so the relative -c path resolves."""
    workdir = "/"
    conf_dir = None
    for instruction in instructions:
        if instruction.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, instruction.args)
        elif instruction.keyword == "COPY":
            sources, dest = _copy_sources_and_dest(instruction)
            if "gunicorn.conf.py" in sources:
                conf_dir = posixpath.normpath(posixpath.join(workdir, dest))
    assert conf_dir is not None, "gunicorn.conf.py is never copied"
    assert posixpath.normpath(workdir) == conf_dir


def test_multiproc_dir_is_private_volume_for_the_user(instructions: list[Instruction]) -> None:
    """PROMETHEUS_MULTIPROC_DIR is a 0700 directory of the app user, then declared a VOLUME."""
    assert _env(instructions)["PROMETHEUS_MULTIPROC_DIR"] == METRICS_DIR
    volume = _last(instructions, "VOLUME")
    assert volume.exec_form() == [METRICS_DIR]
    creating = [
        r
        for r in _all(instructions, "RUN")
        if METRICS_DIR in r.args and re.search(r"\b0?700\b", r.args) and "victor" in r.args
    ]
    assert creating, f"no RUN creates {METRICS_DIR} with mode 0700 owned by the app user"
    # Changes to a path after it is declared a VOLUME are discarded by the builder.
    assert creating[0].line < volume.line


def test_tmpfs_mount_is_documented_for_the_image_uid(instructions: list[Instruction]) -> None:
    """The documented --tmpfs mount of the metrics directory uses the USER's UID and mode 0700."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    documented = re.findall(rf"--tmpfs {re.escape(METRICS_DIR)}:uid=(\d+),mode=0700\b", text)
    assert documented, "document: docker run --tmpfs /run/victor-metrics:uid=...,mode=0700"
    assert {_user_uid(instructions)} == set(documented)


def test_env_is_a_valid_configuration(instructions: list[Instruction]) -> None:
    """The image's VICTOR_* and PROMETHEUS_* variables are known settings and all parse."""
    env = {k: v for k, v in _env(instructions).items() if k.startswith(("VICTOR_", "PROMETHEUS_"))}
    assert set(env) <= {s.env for s in SETTINGS}
    settings = load_settings(env)
    assert (
        load_deployment_settings(env).bind,
        settings.port,
        settings.multiproc_dir,
    ) == ("0.0.0.0:8000", 9090, METRICS_DIR)


def test_exposes_app_and_metrics_ports(instructions: list[Instruction]) -> None:
    """EXPOSE lists the app port 8000 and the master's metrics port 9090."""
    ports = [p for e in _all(instructions, "EXPOSE") for p in e.args.split()]
    assert sorted(ports) == ["8000", "9090"]


def test_healthcheck_gets_healthz_with_python(instructions: list[Instruction]) -> None:
    """HEALTHCHECK runs python -c (slim has no curl) against http://127.0.0.1:8000/healthz."""
    argv = _healthcheck_argv(instructions)
    assert argv[:2] == ["python", "-c"]
    assert len(argv) == 3
    assert "http://127.0.0.1:8000/healthz" in argv[2]


def test_healthcheck_snippet_compiles(instructions: list[Instruction]) -> None:
    """The HEALTHCHECK's python -c snippet is syntactically valid Python."""
    snippet = _healthcheck_argv(instructions)[2]
    compile(snippet, "<HEALTHCHECK>", "exec")


def test_dockerignore_admits_every_copy_source(instructions: list[Instruction]) -> None:
    """.dockerignore excludes everything, then re-includes each COPY source by name."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for copy in _all(instructions, "COPY"):
        for src in _copy_sources_and_dest(copy)[0]:
            assert src.rstrip("/") in allowed, f"add !{src} to .dockerignore"
