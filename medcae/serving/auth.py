"""Optional API keys for the HTTP endpoint, sent as ``Authorization: Bearer <key>``.

Keys are configured as sha256 hex digests, never in clear (``medcae hash-key`` prints one):

- a file of digests, one per line (``#`` starts a comment), given as ``--api-keys-file`` /
  the Serve app's ``api_keys_file`` argument, or ``$MEDCAE_API_KEYS_FILE``; a line may name
  the key and give it a role: ``<digest> name=alice role=label``
  (``medcae hash-key --name alice --role label`` prints one);
- ``$MEDCAE_API_KEY_SHA256``, comma-separated digests.

Roles (:data:`ROLES`, each allowed what the ones before it are): ``predict`` may predict,
``label`` may also read the labeling queue and label, ``admin`` may also train and promote.
A key without a role is a ``predict`` key; without any key configured (loopback only) the
one local user holds every role.

A presented key is hashed and compared with every configured digest in constant time. Serving
on an address other than loopback without any key is refused (:func:`require_keys_for`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from medcae.config import ConfigError
from medcae.serving.api import RequestError

KEYS_FILE_ENV = "MEDCAE_API_KEYS_FILE"
KEY_HASHES_ENV = "MEDCAE_API_KEY_SHA256"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


#: Roles, least first: each may do what the ones before it may.
ROLES = ("predict", "label", "admin")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


@dataclass(frozen=True)
class Key:
    """A configured key: its digest, who holds it and what it may do."""

    digest: str
    name: str
    role: str = "predict"

    def line(self) -> str:
        """The key as a keys-file line (``<digest> name=... role=...``)."""
        name = f" name={self.name}" if _NAME.match(self.name) else ""
        return f"{self.digest}{name} role={self.role}"

    def may(self, role: str) -> bool:
        """Whether this key holds ``role`` (or a higher one)."""
        return ROLES.index(self.role) >= ROLES.index(role)


#: Who asks when no key is configured (loopback only): every role.
LOCAL_USER = Key("", "local", "admin")


def key_line(key: str, name: str | None = None, role: str | None = None) -> str:
    """The keys-file line of ``key``: its digest, then ``name=`` and ``role=`` when given.

    Raises:
        ConfigError: An unknown role or a name with spaces or odd characters.
    """
    parts = [hash_key(key)]
    if name is not None:
        if not _NAME.match(name):
            raise ConfigError(f"key name {name!r}: expected 1-64 letters, digits or _.@-")
        parts.append(f"name={name}")
    if role is not None:
        if role not in ROLES:
            raise ConfigError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        parts.append(f"role={role}")
    return " ".join(parts)


def _key_of_line(line: str, where: str) -> Key:
    digest, *fields = line.split()
    digest = _digest(digest, where)
    found: dict[str, str] = {}
    for field in fields:
        k, sep, v = field.partition("=")
        if not sep or k not in ("name", "role") or k in found:
            raise ConfigError(
                f"{where}: {field!r}: expected the digest, then optionally name=NAME and "
                "role=predict|label|admin"
            )
        found[k] = v
    role = found.get("role", "predict")
    if role not in ROLES:
        raise ConfigError(f"{where}: role {role!r}: expected one of {', '.join(ROLES)}")
    name = found.get("name", f"key:{digest[:8]}")
    if not _NAME.match(name) and "name" in found:
        raise ConfigError(f"{where}: name {name!r}: expected 1-64 letters, digits or _.@-")
    return Key(digest, name, role)


def load_keys(
    path: str | Path | None = None,
    extra: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[Key, ...]:
    """:func:`load_key_hashes` with each key's name and role (a digest given twice: the
    first line counts).

    Raises:
        ConfigError: As :func:`load_key_hashes`, and a field that is not ``name=``/``role=``
            or an unknown role, named by file and line.
    """
    env = os.environ if environ is None else environ
    keys: list[Key] = []
    path = path or env.get(KEYS_FILE_ENV) or None
    if path:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"API keys file {path}: cannot read it ({err})") from err
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0]
            if line.strip():
                keys.append(_key_of_line(line, f"API keys file {path}, line {n}"))
    for i, part in enumerate(extra):
        keys.append(_key_of_line(part, f"api_key_sha256, item {i + 1}"))
    for i, part in enumerate(env.get(KEY_HASHES_ENV, "").split(",")):
        if part.strip():
            keys.append(_key_of_line(part, f"${KEY_HASHES_ENV}, item {i + 1}"))
    first: dict[str, Key] = {}
    for k in keys:
        first.setdefault(k.digest, k)
    return tuple(first.values())


def authorize(header: str | None, keys: Iterable[Key], role: str = "predict") -> Key:
    """The key of a request that may act as ``role``.

    Returns:
        The matching key, or :data:`LOCAL_USER` when no keys are configured.

    Raises:
        RequestError: 401 without a bearer key, 403 ``bad_api_key`` for a key that matches
            none, 403 ``forbidden`` for a key whose role is below ``role`` (naming both).
    """
    keys = tuple(keys)
    if not keys:
        return LOCAL_USER
    scheme, _, key = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise RequestError(401, "missing_api_key", "send an API key: Authorization: Bearer <key>")
    presented = hash_key(key.strip()).encode()
    found = None
    for k in keys:  # every digest compared, in constant time
        if hmac.compare_digest(presented, k.digest.encode()):
            found = k
    if found is None:
        raise RequestError(403, "bad_api_key", "the API key is not valid for this server")
    if not found.may(role):
        raise RequestError(
            403,
            "forbidden",
            f"the key of {found.name} has the role {found.role}; this needs {role}",
        )
    return found


def hash_key(key: str) -> str:
    """The sha256 hex digest that configures ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def _digest(text: str, where: str) -> str:
    value = text.strip().lower()
    if not _DIGEST.match(value):
        shown = value if len(value) <= 16 else value[:8] + "..."
        raise ConfigError(
            f"{where}: expected a sha256 hex digest (64 hex characters), got {shown!r} "
            f"({len(value)} characters); make one with `medcae hash-key`"
        )
    return value


def load_key_hashes(
    path: str | Path | None = None,
    extra: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """The configured key digests: ``path`` (else ``$MEDCAE_API_KEYS_FILE``), ``extra`` and
    ``$MEDCAE_API_KEY_SHA256``. Empty when none is configured.

    Raises:
        ConfigError: A missing or unreadable file, or a line that is not a sha256 digest
            (named by file and line).
    """
    return tuple(k.digest for k in load_keys(path, extra, environ))


def check_bearer(header: str | None, hashes: Iterable[str]) -> str:
    """Accept the request when no keys are configured or its bearer key matches one.

    Returns:
        Who asked, for the answer log: ``key:<first 8 hex of the matching digest>``, or
        ``anonymous`` when no keys are configured.

    Raises:
        RequestError: 401 ``missing_api_key`` without a bearer key, 403 ``bad_api_key`` for
            a key that matches none.
    """
    hashes = tuple(hashes)
    if not hashes:
        return "anonymous"
    scheme, _, key = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise RequestError(401, "missing_api_key", "send an API key: Authorization: Bearer <key>")
    presented = hash_key(key.strip()).encode()
    who = ""
    for digest in hashes:  # every digest compared, in constant time
        if hmac.compare_digest(presented, digest.encode()):
            who = f"key:{digest[:8]}"
    if not who:
        raise RequestError(403, "bad_api_key", "the API key is not valid for this server")
    return who


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) binds to loopback only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_keys_for(host: str, hashes: Iterable[str]) -> None:
    """Refuse to serve beyond loopback without API keys.

    Raises:
        ConfigError: ``host`` is not loopback and no key is configured; the message says how
            to configure one.
    """
    if not is_loopback(host) and not tuple(hashes):
        raise ConfigError(
            f"refusing to serve on {host} without API keys: anyone who can reach it could use "
            f"the model. Make a key's digest with `medcae hash-key`, then pass "
            f"--api-keys-file FILE (one digest per line), or set ${KEYS_FILE_ENV} or "
            f"${KEY_HASHES_ENV}; or serve on 127.0.0.1"
        )


HOSTS_ENV = "MEDCAE_ALLOWED_HOSTS"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_HOST_NAME = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$|^[0-9a-f:.]+$")


def _host_name(text: str) -> str:
    """``Example.ORG.`` -> ``example.org``, ``[::1]`` -> ``::1``."""
    return text.strip().strip("[]").rstrip(".").lower()


def parse_hosts(value: str | Iterable[str] | None, where: str = "allowed_hosts") -> tuple[str, ...]:
    """Host names a server answers to: ``name``, ``*.domain`` (its subdomains) or ``*`` (any).

    Args:
        value: Comma-separated text or a list.
        where: The setting's name, for the error message.

    Raises:
        ConfigError: An entry that is not a host name, an address or a ``*.`` pattern.
    """
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        name = _host_name(str(item))
        if not name:
            continue
        if name != "*" and not _HOST_NAME.match(name):
            raise ConfigError(
                f"{where}: {str(item)[:60]!r} is not a host name, an address, '*.domain' or '*'"
            )
        out.append(name)
    return tuple(dict.fromkeys(out))


def allowed_hosts_for(
    bind: str, given: str | Iterable[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The Host header values a server bound to ``bind`` accepts.

    ``given`` (else ``$MEDCAE_ALLOWED_HOSTS``) when set; otherwise the loopback names, plus
    ``bind`` itself when it is a specific address or name.

    Raises:
        ConfigError: ``bind`` is a wildcard address (``0.0.0.0``, ``::``) and no host names
            are given: which names clients use cannot be guessed, and accepting any would let
            a DNS-rebinding page reach the server.
    """
    env = os.environ if environ is None else environ
    hosts = parse_hosts(given) or parse_hosts(env.get(HOSTS_ENV), f"${HOSTS_ENV}")
    if hosts:
        return hosts
    name = _host_name(bind)
    if name in ("0.0.0.0", "::", ""):
        raise ConfigError(
            f"serving on {bind} (every interface) needs the host names clients use: pass "
            f"--allowed-hosts NAME[,NAME...] (or set ${HOSTS_ENV}); '*' accepts any Host header"
        )
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, *parse_hosts([name]))))


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request's ``Host`` header (port ignored) names this server.

    A missing or malformed header is refused unless ``allowed`` holds ``*``.
    """
    allowed = tuple(allowed)
    if "*" in allowed:
        return True
    text = (header or "").strip()
    if text.startswith("["):  # [v6]:port
        name = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        name = text.rsplit(":", 1)[0]
    else:
        name = text
    name = _host_name(name)
    if not name or not _HOST_NAME.match(name):
        return False
    return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)
