"""Prometheus exporter-toolkit web configuration (``--web.config.file``) for the metrics port.

The file format is exporter-toolkit's (docs/web-configuration.md): ``tls_server_config``,
``http_server_config``, ``basic_auth_users`` and ``rate_limit``. Invariants:

* Loading is strict, as exporter-toolkit's ``yaml.UnmarshalStrict``: an unknown or duplicate
  key, a value of the wrong type, a missing or unreadable file, a certificate and key that do
  not load, or a password entry that is not a bcrypt hash raise :class:`WebConfigError`,
  whose message names the file, the key and what to do. A loaded config always yields a
  working ``ssl.SSLContext`` (it is built once at load time to prove it).
* Relative paths are relative to the config file's directory, as in exporter-toolkit.
* ``client_auth_type`` maps to OpenSSL verify modes so that no client exporter-toolkit would
  refuse is admitted:

  ==========================  ===============  =============================================
  client_auth_type            verify_mode      notes
  ==========================  ===============  =============================================
  NoClientCert (default)      CERT_NONE        a client CA is an error, as in the toolkit
  RequestClientCert           CERT_NONE        Go requests a certificate but never checks
                                               it, so not asking admits the same clients
  RequireAnyClientCert        CERT_REQUIRED    stricter than Go, see below
  VerifyClientCertIfGiven     CERT_OPTIONAL    client CA, else the system roots (as Go)
  RequireAndVerifyClientCert  CERT_REQUIRED    client CA, else the system roots (as Go)
  ==========================  ===============  =============================================

  RequireAnyClientCert (and its old alias RequireClientCert) asks Go to demand a
  certificate without verifying it. Python's ``ssl`` has no verify callback: a required
  certificate is always verified against the loaded CAs. Accepting unverified certificates
  is impossible and silently dropping the requirement would be insecure, so the mode is
  served as "require and verify against ``client_ca_file``/``client_ca``", and a config
  with no client CA is refused at load time (instead of refusing every client later).
* Basic auth: user names are compared in constant time against every configured user (no
  early exit), unknown users still cost one bcrypt check, successful checks are cached
  under an HMAC of (user, hash, password) with a per-process random key (never the
  password itself), at most :data:`AUTH_CACHE_SIZE` entries, and bcrypt runs one at a time.
  As in Go and htpasswd, only a password's first 72 bytes count.

Accepted but without effect here: ``http_server_config.http2`` (the server speaks HTTP/1.1;
ALPN offers only ``http/1.1``), TLS 1.3 names in ``cipher_suites`` (Go ignores them too),
and ``prefer_server_cipher_suites`` beyond OpenSSL's server-preference flag. With several
``curve_preferences`` OpenSSL's default group list (which holds all four) is kept: Python
3.11's ``ssl`` can restrict to one curve only. ``rate_limit`` with a non-zero ``interval``
is refused: this server bounds load with its connection cap and worker queue instead.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

__all__ = [
    "AUTH_CACHE_SIZE", "CLIENT_AUTH_TYPES", "TLSServerConfig", "WebConfig", "WebConfigError",
    "load_web_config",
]

AUTH_CACHE_SIZE = 128
CLIENT_AUTH_TYPES = (
    "NoClientCert", "RequestClientCert", "RequireAnyClientCert", "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
_CLIENT_AUTH_ALIASES = {"": "NoClientCert", "RequireClientCert": "RequireAnyClientCert"}
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's crypto/tls cipher suite names (tls.CipherSuites()) -> OpenSSL names. TLS 1.3 suites
# map to None: Go ignores them in cipher_suites, and so does OpenSSL's set_ciphers.
_CIPHERS: dict[str, str | None] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
}
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
           "X25519": "X25519"}
# exporter-toolkit's extraHTTPHeaders: the only configurable headers, some with fixed values.
_HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS = (
    "cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
    "client_allowed_sans", "min_version", "max_version", "cipher_suites",
    "prefer_server_cipher_suites", "curve_preferences",
)
_HTTP_KEYS = ("http2", "headers")
_RATE_KEYS = ("interval", "burst")
_BCRYPT = re.compile(r"\$2[abxy]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}
_HASH_HINT = ("generate one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'` or "
              "`python -c 'import bcrypt,getpass; "
              "print(bcrypt.hashpw(getpass.getpass().encode(), bcrypt.gensalt()).decode())'`")
_BCRYPT_MAX_BYTES = 72


class WebConfigError(ValueError):
    """A web config file that cannot be used; the message names the file, key and fix."""


@dataclass(frozen=True)
class TLSServerConfig:
    """``tls_server_config``: paths are absolute (resolved against the config's directory)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    client_ca_file: Path | None = None
    client_ca: str | None = field(default=None, repr=False)
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: tuple[str, ...] | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        """The OpenSSL verify mode that ``client_auth_type`` maps to (see the module doc)."""
        return {
            "NoClientCert": ssl.CERT_NONE,
            "RequestClientCert": ssl.CERT_NONE,
            "RequireAnyClientCert": ssl.CERT_REQUIRED,
            "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
            "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
        }[self.client_auth_type]


class _BasicAuth:
    """bcrypt checks with a bounded cache of successes; thread-safe."""

    def __init__(self, users: tuple[tuple[str, str], ...]) -> None:
        self._users = tuple((name.encode(), hashed.encode()) for name, hashed in users)
        self._key = secrets.token_bytes(32)
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()  # one bcrypt at a time: it is CPU-bound
        self._fake: bytes | None = None

    def _fake_hash(self) -> bytes:
        """A hash of a random password at the users' highest cost, for unknown users."""
        if self._fake is None:
            cost = max(int(hashed.split(b"$")[2]) for _, hashed in self._users)
            self._fake = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        return self._fake

    def check(self, header: str | None) -> bool:
        if not self._users:
            return True
        credentials = _parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        password = password[:_BCRYPT_MAX_BYTES]
        found: bytes | None = None
        for name, hashed in self._users:  # no early exit: time does not tell which user
            if hmac.compare_digest(name, user):
                found = hashed
        hashed = found if found is not None else self._fake_hash()
        key = hmac.new(self._key, b"\0".join((user, hashed, password)), hashlib.sha256).digest()
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return found is not None
        with self._bcrypt_lock:
            try:
                ok = bcrypt.checkpw(password, hashed)
            except ValueError:
                ok = False
        if not (ok and found is not None):
            return False
        with self._cache_lock:
            self._cache[key] = None
            while len(self._cache) > AUTH_CACHE_SIZE:
                self._cache.popitem(last=False)
        return True


def _parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) of a ``Basic`` Authorization header, or None if it is not one."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


@dataclass(frozen=True)
class WebConfig:
    """A loaded web config. ``ssl_context()`` re-reads the certificate files on each call."""

    path: Path
    tls: TLSServerConfig | None = None
    headers: tuple[tuple[str, str], ...] = ()
    http2: bool = True
    basic_auth_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    _auth: _BasicAuth = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_auth", _BasicAuth(self.basic_auth_users))

    @property
    def users(self) -> tuple[str, ...]:
        """The configured basic-auth user names."""
        return tuple(name for name, _ in self.basic_auth_users)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A new server context from the current files, or None when TLS is not configured.

        Raises :class:`WebConfigError` if a file changed into something unusable; pass the
        result to the server's ``reload_ssl`` to rotate certificates.
        """
        if self.tls is None:
            return None
        return _build_context(self.path, self.tls)

    def check_basic_auth(self, authorization_header: str | None) -> bool:
        """True if no users are configured or the header carries a valid user and password."""
        return self._auth.check(authorization_header)

    def check_client_certificate(self, peercert: Mapping[str, Any]) -> bool:
        """``client_allowed_sans``: True if unset or a SAN of the verified client certificate
        (``SSLSocket.getpeercert()``) is exactly one of them (DNS, IP, e-mail or URI)."""
        allowed = self.tls.client_allowed_sans if self.tls is not None else None
        if allowed is None:
            return True
        for _kind, value in peercert.get("subjectAltName", ()):
            for candidate in allowed:
                if value == candidate or _same_ip(value, candidate):
                    return True
        return False

    def server_options(self) -> dict[str, Any]:
        """Keyword arguments for ``_httpserver.serve``: TLS, auth, headers and SAN checks."""
        needs_sans = self.tls is not None and self.tls.client_allowed_sans is not None
        return {
            "ssl_context": self.ssl_context(),
            "auth": self.check_basic_auth if self.basic_auth_users else None,
            "extra_headers": self.headers,
            "peer_check": self.check_client_certificate if needs_sans else None,
        }


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.strip()) == ipaddress.ip_address(b.strip())
    except ValueError:
        return False


# -- loading -----------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (Go's strict YAML does)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Ctx:
    """Where we are in the file, to name it in errors."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> WebConfigError:
        where = f"{key}: " if key else ""
        return WebConfigError(f"web config {self.path}: {where}{problem}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"must be a mapping, not {_kind(value)}")
        for name in value:
            if name not in allowed:
                known = ", ".join(allowed)
                raise self.error(
                    f"{key}.{name}" if key else str(name),
                    f"unknown key (exporter-toolkit refuses it too); the keys here are: {known}",
                )
        return value

    def string(self, value: Any, key: str) -> str | None:
        """A string (ints accepted, as Go's YAML does); None and "" mean unset."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(key, f"must be a string, not {_kind(value)}; quote it")
        text = str(value)
        return text or None

    def boolean(self, value: Any, key: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(key, f"must be a list of strings, not {_kind(value)}")
        out = []
        for i, item in enumerate(value):
            text = self.string(item, f"{key}[{i}]")
            if text is None:
                raise self.error(f"{key}[{i}]", "must not be empty")
            out.append(text)
        return tuple(out)

    def file(self, value: Any, key: str) -> Path | None:
        text = self.string(value, key)
        if text is None:
            return None
        path = Path(text)
        return path if path.is_absolute() else self.path.parent / path


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read and validate an exporter-toolkit web config file; raise WebConfigError if unusable."""
    file = Path(path)
    ctx = _Ctx(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WebConfigError(
            f"web config {file}: file not found; fix the path (relative paths are relative to "
            f"the working directory {Path.cwd()})"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise WebConfigError(f"web config {file}: cannot be read: {err}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as err:
        raise WebConfigError(f"web config {file}: not valid YAML: {err}") from None
    top = ctx.mapping(data, "", _TOP_KEYS)
    tls = _load_tls(ctx, top.get("tls_server_config"))
    http = ctx.mapping(top.get("http_server_config"), "http_server_config", _HTTP_KEYS)
    http2 = ctx.boolean(http.get("http2"), "http_server_config.http2", True)
    headers = _load_headers(ctx, http.get("headers"))
    users = _load_users(ctx, top.get("basic_auth_users"))
    _check_rate_limit(ctx, top.get("rate_limit"))
    config = WebConfig(
        path=file, tls=tls, headers=headers, http2=http2, basic_auth_users=users
    )
    config.ssl_context()  # prove the certificate, key and CA load now
    return config


def _load_tls(ctx: _Ctx, value: Any) -> TLSServerConfig | None:
    section = "tls_server_config"
    raw = ctx.mapping(value, section, _TLS_KEYS)

    def key(name: str) -> str:
        return f"{section}.{name}"

    cert = ctx.string(raw.get("cert"), key("cert"))
    secret = ctx.string(raw.get("key"), key("key"))
    client_ca = ctx.string(raw.get("client_ca"), key("client_ca"))
    cert_file = ctx.file(raw.get("cert_file"), key("cert_file"))
    key_file = ctx.file(raw.get("key_file"), key("key_file"))
    ca_file = ctx.file(raw.get("client_ca_file"), key("client_ca_file"))
    auth_type = ctx.string(raw.get("client_auth_type"), key("client_auth_type")) or ""
    enabled = any((cert, secret, client_ca, cert_file, key_file, ca_file, auth_type))
    if not enabled:
        return None  # no TLS, as exporter-toolkit's IsEnabled
    if cert_file is None and cert is None:
        raise ctx.error(key("cert_file"), "missing one of cert or cert_file; set cert_file to "
                                          "the server certificate (PEM)")
    if key_file is None and secret is None:
        raise ctx.error(key("key_file"), "missing one of key or key_file; set key_file to the "
                                         "server's private key (PEM)")
    for inline, path_key in (("cert", "cert_file"), ("key", "key_file"),
                             ("client_ca", "client_ca_file")):
        if raw.get(inline) and raw.get(path_key):
            raise ctx.error(key(inline), f"set either {inline} (inline PEM) or {path_key}, "
                                         "not both")
    auth_type = _CLIENT_AUTH_ALIASES.get(auth_type, auth_type)
    if auth_type not in CLIENT_AUTH_TYPES:
        raise ctx.error(key("client_auth_type"), f"invalid value {auth_type!r}; use one of "
                        f"{', '.join(CLIENT_AUTH_TYPES)} (RequireAndVerifyClientCert to "
                        "require certificates signed by client_ca_file)")
    has_ca = ca_file is not None or client_ca is not None
    if has_ca and auth_type == "NoClientCert":
        raise ctx.error(key("client_auth_type"), "client CA's have been configured without a "
                        "Client Auth Policy; set client_auth_type: RequireAndVerifyClientCert")
    if auth_type == "RequireAnyClientCert" and not has_ca:
        raise ctx.error(key("client_auth_type"), "RequireAnyClientCert without client_ca_file "
                        "cannot be served: Python's ssl cannot require a certificate without "
                        "verifying it, so it verifies against the client CA; set "
                        "client_ca_file (or use RequireAndVerifyClientCert with it)")
    versions = []
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        version = ctx.string(raw.get(name), key(name)) or default
        if version not in _TLS_VERSIONS:
            raise ctx.error(key(name), f"unknown TLS version {version!r}; use one of "
                            f"{', '.join(_TLS_VERSIONS)}")
        versions.append(version)
    if _TLS_VERSIONS[versions[0]] > _TLS_VERSIONS[versions[1]]:
        raise ctx.error(key("min_version"), f"{versions[0]} is above max_version "
                        f"{versions[1]}; lower min_version or raise max_version")
    ciphers = ctx.strings(raw.get("cipher_suites"), key("cipher_suites")) or ()
    for i, name in enumerate(ciphers):
        if name not in _CIPHERS:
            raise ctx.error(f"{key('cipher_suites')}[{i}]", f"unknown cipher {name!r}; use "
                            "Go's names, e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")
    curves = ctx.strings(raw.get("curve_preferences"), key("curve_preferences")) or ()
    for i, name in enumerate(curves):
        if name not in _CURVES:
            raise ctx.error(f"{key('curve_preferences')}[{i}]", f"unknown curve {name!r}; use "
                            f"one of {', '.join(_CURVES)}")
    sans = ctx.strings(raw.get("client_allowed_sans"), key("client_allowed_sans"))
    if sans is not None and auth_type not in ("RequireAnyClientCert",
                                              "RequireAndVerifyClientCert"):
        raise ctx.error(key("client_allowed_sans"), "needs client_auth_type "
                        "RequireAndVerifyClientCert (or RequireAnyClientCert): other types "
                        "admit clients without a certificate")
    return TLSServerConfig(
        cert_file=cert_file, key_file=key_file, cert=cert, key=secret,
        client_ca_file=ca_file, client_ca=client_ca, client_auth_type=auth_type,
        client_allowed_sans=sans, min_version=versions[0], max_version=versions[1],
        cipher_suites=ciphers,
        prefer_server_cipher_suites=ctx.boolean(
            raw.get("prefer_server_cipher_suites"), key("prefer_server_cipher_suites"), True
        ),
        curve_preferences=curves,
    )


def _load_headers(ctx: _Ctx, value: Any) -> tuple[tuple[str, str], ...]:
    section = "http_server_config.headers"
    raw = ctx.mapping(value, section, tuple(_HEADERS))
    out = []
    for name, item in raw.items():
        text = ctx.string(item, f"{section}.{name}")
        if text is None:
            continue  # "Unset if blank"
        allowed = _HEADERS[name]
        if allowed and text not in allowed:
            raise ctx.error(f"{section}.{name}", f"invalid value {text!r}; expected one of "
                            f"{', '.join(allowed)}")
        if "\r" in text or "\n" in text:
            raise ctx.error(f"{section}.{name}", "must be a single line")
        out.append((name, text))
    return tuple(out)


def _load_users(ctx: _Ctx, value: Any) -> tuple[tuple[str, str], ...]:
    section = "basic_auth_users"
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ctx.error(section, f"must be a mapping of user name to bcrypt hash, not "
                        f"{_kind(value)}")
    users = []
    for name, hashed in value.items():
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise ctx.error(f"{section}.{name}", "a user name must be a string; quote it")
        user = str(name)
        if ":" in user or not user:
            raise ctx.error(f"{section}.{user}", "a user name can neither be empty nor hold ':'")
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
            raise ctx.error(f"{section}.{user}", f"not a bcrypt hash; {_HASH_HINT}")
        users.append((user, hashed))
    return tuple(users)


def _check_rate_limit(ctx: _Ctx, value: Any) -> None:
    section = "rate_limit"
    raw = ctx.mapping(value, section, _RATE_KEYS)
    burst = raw.get("burst")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int)):
        raise ctx.error(f"{section}.burst", f"must be an integer, not {burst!r}")
    interval = _duration(ctx, raw.get("interval"), f"{section}.interval")
    if interval:
        raise ctx.error(f"{section}.interval", "rate limiting is not supported by this server "
                        "(it caps connections and queued scrapes instead); remove rate_limit "
                        "or set interval: 0")


def _duration(ctx: _Ctx, value: Any, key: str) -> float:
    """Seconds of a Go duration ("1m30s", "250ms", 0)."""
    if value is None or value == 0 or value == "0":
        return 0.0
    text = str(value)
    if isinstance(value, bool) or not _DURATION.fullmatch(text):
        raise ctx.error(key, f"invalid duration {value!r}; write e.g. 1s, 500ms or 0")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


# -- TLS context -------------------------------------------------------------------------------


@contextmanager
def _pem_file(path: Path | None, inline: str | None) -> Iterator[str]:
    """A path to read PEM from: the configured file, or a private temporary copy of inline PEM.

    Python's ssl loads certificates and keys from files only; the copy lives in a 0700
    directory, is 0600 and is removed as soon as the context has loaded it.
    """
    if path is not None:
        yield str(path)
        return
    assert inline is not None
    with tempfile.TemporaryDirectory(prefix="victor-webconfig-") as tmp:
        target = Path(tmp) / "inline.pem"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(inline)
        yield str(target)


def _readable(ctx: _Ctx, path: Path | None, key: str, marker: str) -> None:
    if path is None:
        return
    try:
        content = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise ctx.error(key, f"{path}: file not found; fix the path (relative to "
                        f"{ctx.path.parent})") from None
    except OSError as err:
        raise ctx.error(key, f"{path}: cannot be read: {err.strerror}") from None
    if marker not in content:
        raise ctx.error(key, f"{path}: holds no PEM block '{marker}'")


class _EncryptedKey(Exception):
    pass


def _encrypted_key() -> bytes:
    """Password callback: never let OpenSSL prompt on a terminal (it would hang a daemon)."""
    raise _EncryptedKey


def _build_context(config_path: Path, tls: TLSServerConfig) -> ssl.SSLContext:
    ctx = _Ctx(config_path)
    section = "tls_server_config"
    _readable(ctx, tls.cert_file, f"{section}.cert_file", "-----BEGIN CERTIFICATE-----")
    _readable(ctx, tls.key_file, f"{section}.key_file", "PRIVATE KEY-----")
    _readable(ctx, tls.client_ca_file, f"{section}.client_ca_file", "-----BEGIN CERTIFICATE-----")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version = _TLS_VERSIONS[tls.min_version]
        context.maximum_version = _TLS_VERSIONS[tls.max_version]
    except (ValueError, ssl.SSLError) as err:
        raise ctx.error(f"{section}.min_version", f"not supported by this OpenSSL: {err}") from None
    cert_key = f"{section}.{'cert_file' if tls.cert_file else 'cert'}"
    with (
        _pem_file(tls.cert_file, tls.cert) as certfile,
        _pem_file(tls.key_file, tls.key) as keyfile,
    ):
        try:
            context.load_cert_chain(certfile, keyfile, password=_encrypted_key)
        except _EncryptedKey:
            raise ctx.error(f"{section}.{'key_file' if tls.key_file else 'key'}", "the private "
                            "key is encrypted; give an unencrypted PEM key (as exporter-toolkit "
                            "needs), e.g. from `openssl pkey -in KEY -out KEY.plain`") from None
        except (ssl.SSLError, OSError) as err:
            raise ctx.error(cert_key, f"the certificate and key do not load together ({err}); "
                            "check that key_file is the private key of cert_file, unencrypted "
                            "PEM") from None
    context.verify_mode = tls.verify_mode
    if tls.client_auth_type in ("RequireAnyClientCert", "VerifyClientCertIfGiven",
                                "RequireAndVerifyClientCert"):
        try:
            if tls.client_ca_file is not None:
                context.load_verify_locations(cafile=str(tls.client_ca_file))
            elif tls.client_ca is not None:
                context.load_verify_locations(cadata=tls.client_ca)
            else:  # Go's nil ClientCAs: the system roots
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        except (ssl.SSLError, OSError, ValueError) as err:
            name = "client_ca_file" if tls.client_ca_file is not None else "client_ca"
            raise ctx.error(f"{section}.{name}", f"cannot load the client CA: {err}") from None
    names = [n for n in (_CIPHERS[c] for c in tls.cipher_suites) if n is not None]
    if names:
        try:
            context.set_ciphers(":".join(names))
        except ssl.SSLError as err:
            raise ctx.error(f"{section}.cipher_suites", f"rejected by OpenSSL: {err}") from None
    if not tls.prefer_server_cipher_suites:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if len(tls.curve_preferences) == 1:
        context.set_ecdh_curve(_CURVES[tls.curve_preferences[0]])
    context.set_alpn_protocols(["http/1.1"])
    return context
