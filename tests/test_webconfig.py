"""exporter-toolkit web config: loading, refusals, and mutual TLS plus basic auth on a real port.

Certificates are made at test time with the ``openssl`` CLI in a temporary directory: a CA,
a server certificate for 127.0.0.1/localhost and a client certificate, plus a second CA and
server certificate for the reload test. The last test has a real Prometheus scrape the server
over mutual TLS with basic auth.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from victor_mp_metrics import _webconfig
from victor_mp_metrics._httpserver import ServerHandle, serve
from victor_mp_metrics._webconfig import WebConfig, WebConfigError, load_web_config

from ._tools import require_tool

USER = "prometheus"
PASSWORD = "s3cret-scrape"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
BODY = b"# TYPE victor_webconfig_test gauge\nvictor_webconfig_test 1\n"


@dataclass(frozen=True)
class Pki:
    """Files of the test PKI."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    ca2: Path
    server2_cert: Path
    server2_key: Path


def _openssl(directory: Path, *args: str) -> None:
    openssl = require_tool("openssl", "apt-get install openssl")
    subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(directory, "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.crt", "-days", "2", "-subj", f"/CN=victor test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
             f"{ca}.key", "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-out",
             f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with server and client certificates, and a second CA with a server certificate."""
    directory = tmp_path_factory.mktemp("pki")
    server_ext = ("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                  "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _make_ca(directory, "ca")
    _make_ca(directory, "ca2")
    _make_leaf(directory, "server", "ca", server_ext)
    _make_leaf(directory, "server2", "ca2", server_ext)
    _make_leaf(directory, "client", "ca", "basicConstraints=CA:FALSE\n"
               "extendedKeyUsage=clientAuth\nsubjectAltName=DNS:scraper.example\n")
    return Pki(*(directory / name for name in (
        "ca.crt", "server.crt", "server.key", "client.crt", "client.key", "ca2.crt",
        "server2.crt", "server2.key")))


def write_config(directory: Path, config: Any, name: str = "web.yml") -> Path:
    """Write ``config`` (a dict, dumped as YAML, or raw text) to ``directory/name``."""
    path = directory / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def mtls_config(pki: Pki, **tls: Any) -> dict[str, Any]:
    """RequireAndVerifyClientCert with the test CA, a bcrypt user and one extra header."""
    return {
        "tls_server_config": {
            "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
            "client_ca_file": str(pki.ca), "client_auth_type": "RequireAndVerifyClientCert",
            **tls,
        },
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
        "basic_auth_users": {USER: HASH},
    }


def handler(method: str, path: str, query: dict[str, list[str]],
            headers: dict[str, str]) -> tuple[str, list[tuple[str, str]], bytes]:
    """/metrics answers BODY; anything else is 404."""
    if path != "/metrics":
        return "404 Not Found", [], b"not found\n"
    return "200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], BODY


@pytest.fixture
def start() -> Iterator[Callable[..., ServerHandle]]:
    """start(**serve options) runs a server on 127.0.0.1; all are stopped after the test."""
    handles: list[ServerHandle] = []

    def run(**options: Any) -> ServerHandle:
        handle = serve(handler, "127.0.0.1", 0, **options)
        handles.append(handle)
        return handle

    yield run
    for handle in handles:
        handle.stop()


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca``, presenting ``cert`` if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def basic(user: str, password: str) -> str:
    """An Authorization header value for Basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def https_get(port: int, context: ssl.SSLContext, authorization: str | None = None,
              conn: http.client.HTTPSConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET /metrics over TLS; a fresh connection unless ``conn`` is given (then it is kept)."""
    own = conn is None
    conn = conn or http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": authorization}
                     if authorization else {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        if own:
            conn.close()


def refused(action: Callable[[], object]) -> bool:
    """True if ``action`` fails the way a refused TLS client does (handshake, reset, EOF)."""
    try:
        action()
    except (ssl.SSLError, ConnectionError, http.client.HTTPException, TimeoutError):
        return True
    return False


def test_mutual_tls_and_basic_auth_gate_the_scrape(
    tmp_path: Path, pki: Pki, start: Callable[..., ServerHandle]
) -> None:
    """Plain HTTP and certificate-less TLS are closed; a client cert with a wrong password
    gets 401; the right certificate and password get 200 with the configured header."""
    config = load_web_config(write_config(tmp_path, mtls_config(pki)))
    handle = start(**config.server_options(), header_timeout=2.0)
    port = handle.port

    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        plain.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = plain.recv(65536)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/"), answer

    assert refused(lambda: https_get(port, client_context(pki.ca), basic(USER, PASSWORD)))

    with_cert = client_context(pki.ca, pki.client_cert, pki.client_key)
    status, headers, _ = https_get(port, with_cert, basic(USER, "wrong"))
    assert (401, 'Basic realm="metrics"') == (status, headers["www-authenticate"])
    assert 401 == https_get(port, with_cert)[0]
    assert 401 == https_get(port, with_cert, basic("nobody", PASSWORD))[0]
    status, headers, body = https_get(port, with_cert, basic(USER, PASSWORD))
    assert (200, BODY, "nosniff") == (status, body, headers["x-content-type-options"])
    assert handle.stats()["handshake_failed"] >= 2


def test_large_answers_cross_tls_whole(tmp_path: Path, pki: Pki) -> None:
    """A multi-megabyte body is written through TLS partial writes intact, twice on one
    keep-alive connection."""
    body = os.urandom(6 * 1024 * 1024)
    config = load_web_config(write_config(tmp_path, {
        "tls_server_config": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}}))
    handle = serve(lambda *_: ("200 OK", [], body), "127.0.0.1", 0, **config.server_options())
    conn = http.client.HTTPSConnection("127.0.0.1", handle.port, context=client_context(pki.ca),
                                       timeout=10)
    try:
        for _ in range(2):
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert (200, body) == (response.status, response.read())
    finally:
        conn.close()
        handle.stop()


def test_stalled_tls_handshakes_are_closed_within_header_timeout(
    tmp_path: Path, pki: Pki, start: Callable[..., ServerHandle]
) -> None:
    """Connections that never start (or never finish) the handshake are closed in time."""
    config = load_web_config(write_config(tmp_path, mtls_config(pki)))
    handle = start(**config.server_options(), header_timeout=0.5)
    socks = [socket.create_connection(("127.0.0.1", handle.port), timeout=3) for _ in range(20)]
    try:
        socks[0].sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        started = time.monotonic()
        for sock in socks:
            try:
                assert b"" == sock.recv(1024)
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 1.5
        assert handle.stats()["timed_out"] == 20
    finally:
        for sock in socks:
            sock.close()


def test_reload_ssl_serves_new_certificates_to_new_connections(
    tmp_path: Path, pki: Pki, start: Callable[..., ServerHandle]
) -> None:
    """After the files are replaced and reload_ssl(config.ssl_context()), new connections get
    the new certificate; a keep-alive connection from before keeps working."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    config = load_web_config(write_config(tmp_path, {
        "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"}}))
    handle = start(**config.server_options())
    old, new = client_context(pki.ca), client_context(pki.ca2)
    kept = http.client.HTTPSConnection("127.0.0.1", handle.port, context=old, timeout=5)
    try:
        assert 200 == https_get(handle.port, old, conn=kept)[0]
        assert refused(lambda: https_get(handle.port, new))

        shutil.copy(pki.server2_cert, cert)
        shutil.copy(pki.server2_key, key)
        context = config.ssl_context()
        assert context is not None
        handle.reload_ssl(context)

        assert 200 == https_get(handle.port, new)[0]
        assert refused(lambda: https_get(handle.port, old))
        assert 200 == https_get(handle.port, old, conn=kept)[0]
    finally:
        kept.close()


def test_client_allowed_sans_vet_the_client_certificate(
    tmp_path: Path, pki: Pki, start: Callable[..., ServerHandle]
) -> None:
    """client_allowed_sans admits a certificate with a listed SAN and closes the others."""
    with_cert = client_context(pki.ca, pki.client_cert, pki.client_key)
    for sans, allowed in ((["other", "scraper.example"], True), (["other"], False)):
        config = load_web_config(write_config(
            tmp_path, mtls_config(pki, client_allowed_sans=sans), f"web-{allowed}.yml"))
        handle = start(**config.server_options())
        if allowed:
            assert 200 == https_get(handle.port, with_cert, basic(USER, PASSWORD))[0]
        else:
            assert refused(partial(https_get, handle.port, with_cert, basic(USER, PASSWORD)))


@pytest.mark.parametrize(
    ("auth_type", "mode"),
    [
        ("NoClientCert", ssl.CERT_NONE),
        ("RequestClientCert", ssl.CERT_NONE),
        ("RequireAnyClientCert", ssl.CERT_REQUIRED),
        ("RequireClientCert", ssl.CERT_REQUIRED),
        ("VerifyClientCertIfGiven", ssl.CERT_OPTIONAL),
        ("RequireAndVerifyClientCert", ssl.CERT_REQUIRED),
    ],
)
def test_client_auth_type_maps_to_verify_mode(
    tmp_path: Path, pki: Pki, auth_type: str, mode: ssl.VerifyMode
) -> None:
    """Each client_auth_type gives the documented OpenSSL verify mode."""
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
           "client_auth_type": auth_type}
    if auth_type not in ("NoClientCert",):
        tls["client_ca_file"] = str(pki.ca)
    config = load_web_config(write_config(tmp_path, {"tls_server_config": tls}))
    context = config.ssl_context()
    assert context is not None and mode == context.verify_mode


def test_good_configs_load(tmp_path: Path, pki: Pki) -> None:
    """Empty files mean plain HTTP and no auth; inline PEM, relative paths, versions, ciphers,
    curves and headers load as exporter-toolkit reads them."""
    empty = load_web_config(write_config(tmp_path, "", "empty.yml"))
    assert (None, None, True) == (empty.tls, empty.ssl_context(), empty.check_basic_auth(None))
    assert {"ssl_context": None, "auth": None, "extra_headers": (), "peer_check": None} == (
        empty.server_options())

    shutil.copy(pki.server_cert, tmp_path / "rel.crt")
    config = load_web_config(write_config(tmp_path, {
        "tls_server_config": {
            "cert_file": "rel.crt", "key": pki.server_key.read_text(),
            "client_ca": pki.ca.read_text(), "client_auth_type": "VerifyClientCertIfGiven",
            "min_version": "TLS12", "max_version": "TLS12",
            "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"],
            "prefer_server_cipher_suites": False, "curve_preferences": ["CurveP256"],
        },
        "http_server_config": {"http2": False, "headers": {
            "X-Frame-Options": "deny", "X-XSS-Protection": 1, "Strict-Transport-Security": "",
            "Content-Security-Policy": "default-src 'self'"}},
        "rate_limit": {"interval": 0, "burst": 0},
    }))
    assert config.tls is not None and tmp_path / "rel.crt" == config.tls.cert_file
    assert "PRIVATE KEY" not in repr(config)
    context = config.ssl_context()
    assert context is not None
    assert (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2) == (
        context.minimum_version, context.maximum_version)
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert {"ECDHE-ECDSA-AES128-GCM-SHA256"} == tls12
    assert {"X-Frame-Options": "deny", "X-XSS-Protection": "1",
            "Content-Security-Policy": "default-src 'self'"} == dict(config.headers)


BAD_CONFIGS: list[tuple[str, Any, str]] = [
    ("unknown top key", {"tls_config": {}}, "tls_config"),
    ("unknown tls key", {"tls_server_config": {"cert_filse": "x"}}, "tls_server_config.cert_filse"),
    ("bad client_auth_type", "MTLS:client_auth_type=Sometimes", "client_auth_type"),
    ("bad min_version", "MTLS:min_version=TLS111", "min_version"),
    ("min above max", "MTLS:min_version=TLS13,max_version=TLS12", "min_version"),
    ("missing cert_file", "MTLS:cert_file=missing.crt", "cert_file"),
    ("missing client_ca_file", "MTLS:client_ca_file=nope.pem", "client_ca_file"),
    ("cert without key", {"tls_server_config": {"cert_file": "x.crt"}}, "key_file"),
    ("key without cert", {"tls_server_config": {"key_file": "x.key"}}, "cert_file"),
    ("ca without policy", "MTLS:client_auth_type=NoClientCert", "client_auth_type"),
    ("require any without ca", "MTLS:client_auth_type=RequireAnyClientCert,client_ca_file=",
     "RequireAnyClientCert"),
    ("unknown cipher", "MTLS:cipher_suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048",
     "cipher_suites[0]"),
    ("unknown curve", "MTLS:curve_preferences=CurveP257", "curve_preferences[0]"),
    ("sans without required cert", "MTLS:client_auth_type=VerifyClientCertIfGiven,"
     "client_allowed_sans=a", "client_allowed_sans"),
    ("not a bcrypt hash", {"basic_auth_users": {"john": "doe"}}, "basic_auth_users.john"),
    ("unknown header", {"http_server_config": {"headers": {"Content-Type": "foo"}}},
     "http_server_config.headers.Content-Type"),
    ("bad header value", {"http_server_config": {"headers": {"X-Frame-Options": "foo"}}},
     "X-Frame-Options"),
    ("rate limit", {"rate_limit": {"interval": "1s", "burst": 2}}, "rate_limit.interval"),
    ("duplicate key", "basic_auth_users: {}\nbasic_auth_users: {}\n", "duplicate key"),
    ("junk", "hWkNKCp3fvIx3jKnsaBI\nTuEjdwNS8A2vYdFbiKqr\n", "must be a mapping"),
    ("bad yaml", "tls_server_config: [\n", "not valid YAML"),
]


def _bad_config(pki: Pki, spec: Any) -> Any:
    """Expand "MTLS:key=value,..." into the mutual-TLS config with those TLS keys changed."""
    if not (isinstance(spec, str) and spec.startswith("MTLS:")):
        return spec
    config = mtls_config(pki)
    for item in spec[5:].split(","):
        name, _, value = item.partition("=")
        lists = ("cipher_suites", "curve_preferences", "client_allowed_sans")
        config["tls_server_config"][name] = [value] if name in lists else value
    return config


@pytest.mark.parametrize(("case", "spec", "named"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configs_name_the_file_and_key(
    tmp_path: Path, pki: Pki, case: str, spec: Any, named: str
) -> None:
    """Every unusable config is a WebConfigError naming the file and the offending key."""
    path = write_config(tmp_path, _bad_config(pki, spec))
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and named in str(info.value), str(info.value)
    assert HASH not in str(info.value)


def test_encrypted_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    """An encrypted private key is a WebConfigError naming key_file, never a password prompt."""
    _openssl(tmp_path, "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-keyout", "enc.key", "-out", "enc.crt", "-days",
             "1", "-subj", "/CN=enc", "-passout", "pass:secret")
    path = write_config(tmp_path, {"tls_server_config": {"cert_file": "enc.crt",
                                                         "key_file": "enc.key"}})
    with pytest.raises(WebConfigError, match=r"key_file: the private key is encrypted"):
        load_web_config(path)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    """A config path that does not exist is a WebConfigError naming it."""
    with pytest.raises(WebConfigError, match=r"nowhere\.yml: file not found"):
        load_web_config(tmp_path / "nowhere.yml")


def test_basic_auth_checks_and_caches_only_successes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right credentials pass (bcrypt once, then the cache); wrong, unknown and malformed
    ones fail, each wrong attempt costing a bcrypt check."""
    long_password = "p" * 100
    long_hash = bcrypt.hashpw(long_password[:72].encode(), bcrypt.gensalt(rounds=4)).decode()
    config = load_web_config(write_config(tmp_path, {
        "basic_auth_users": {USER: HASH, "other": HASH.replace("$2b$", "$2y$"),
                             "long": long_hash}}))
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return bool(real(password, hashed))

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    assert config.check_basic_auth(basic(USER, PASSWORD))
    assert config.check_basic_auth(basic(USER, PASSWORD))
    assert config.check_basic_auth("basic " + basic(USER, PASSWORD).split()[1])
    assert 1 == len(calls)
    assert config.check_basic_auth(basic("other", PASSWORD))  # $2y$, as htpasswd writes
    assert config.check_basic_auth(basic("long", long_password))  # first 72 bytes, as Go
    calls.clear()
    for header in (basic(USER, "wrong"), basic(USER, "wrong"), basic("nobody", PASSWORD)):
        assert not config.check_basic_auth(header)
    assert 3 == len(calls)
    for malformed in (None, "", "Bearer abc", "Basic !!!", "Basic " + base64.b64encode(
            b"no-colon").decode()):
        assert not config.check_basic_auth(malformed)
    assert {"prometheus", "other", "long"} == set(config.users)
    assert HASH not in repr(config)


def test_cache_is_bounded(tmp_path: Path) -> None:
    """The success cache never holds more than AUTH_CACHE_SIZE entries."""
    users = {f"u{i}": HASH for i in range(_webconfig.AUTH_CACHE_SIZE + 20)}
    config: WebConfig = load_web_config(write_config(tmp_path, {"basic_auth_users": users}))
    for name in users:
        assert config.check_basic_auth(basic(name, PASSWORD))
    assert _webconfig.AUTH_CACHE_SIZE == len(config._auth._cache)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.prometheus
def test_prometheus_scrapes_over_mutual_tls_with_basic_auth(
    tmp_path: Path, pki: Pki, start: Callable[..., ServerHandle]
) -> None:
    """A real Prometheus with tls_config and basic_auth reports the target up."""
    binary = require_tool("prometheus", "apt-get install prometheus")
    config = load_web_config(write_config(tmp_path, mtls_config(pki)))
    handle = start(**config.server_options())
    prom_config = write_config(tmp_path, {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{
            "job_name": "victor_mtls",
            "scheme": "https",
            "tls_config": {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                           "key_file": str(pki.client_key)},
            "basic_auth": {"username": USER, "password": PASSWORD},
            "static_configs": [{"targets": [f"127.0.0.1:{handle.port}"]}],
        }],
    }, "prometheus.yml")
    port = _free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={prom_config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    targets: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/api/v1/targets?state=active", timeout=2) as r:
                    targets = json.loads(r.read())["data"]["activeTargets"]
            except OSError:
                targets = []
            if targets and all(t["health"] == "up" for t in targets):
                break
            time.sleep(0.25)
        summary = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
        assert 1 == len(targets) and "up" == targets[0]["health"], (
            f"{summary}\n{log.read_text()[-3000:]}")
        assert handle.stats()["requests"] >= 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
