"""API keys: digests from a file or the environment, bearer checks, and no open server beyond
loopback (the HTTP side is in tests/test_serve.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT

from medcae.config import ConfigError
from medcae.serving.api import RequestError
from medcae.serving.auth import (
    check_bearer,
    hash_key,
    is_loopback,
    load_key_hashes,
    require_keys_for,
)

KEY = "s3cret-key"
DIGEST = hash_key(KEY)


def test_digests_from_file_and_environment(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# team A\n{DIGEST.upper()}  # upper case is fine\n\n{hash_key('b')}\n")
    env = {"MEDCAE_API_KEY_SHA256": f" {hash_key('c')} ,{DIGEST}"}
    assert load_key_hashes(f, environ=env) == (DIGEST, hash_key("b"), hash_key("c"))
    env_file = {"MEDCAE_API_KEYS_FILE": str(f)}
    assert load_key_hashes(environ=env_file) == (DIGEST, hash_key("b"))
    assert load_key_hashes(environ={}) == ()


def test_a_key_in_clear_or_a_missing_file_is_named(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"{DIGEST}\n{KEY}\n")
    with pytest.raises(ConfigError, match=r"keys, line 2: expected a sha256 hex digest.*hash-key"):
        load_key_hashes(f, environ={})
    with pytest.raises(ConfigError, match=r"item 1: expected a sha256"):
        load_key_hashes(environ={"MEDCAE_API_KEY_SHA256": "abc"})
    with pytest.raises(ConfigError, match=r"API keys file .*nope: cannot read it"):
        load_key_hashes(tmp_path / "nope", environ={})


def test_bearer_missing_wrong_right():
    check_bearer(None, ())  # no keys configured: open
    for header in (None, "", "Bearer ", "Basic abc", KEY):
        with pytest.raises(RequestError) as err:
            check_bearer(header, (DIGEST,))
        assert (err.value.status, err.value.code) == (401, "missing_api_key"), header
    for header in ("Bearer wrong", f"Bearer {KEY}x", f"Bearer {DIGEST}"):
        with pytest.raises(RequestError) as err:
            check_bearer(header, (hash_key("other"), DIGEST))
        assert (err.value.status, err.value.code) == (403, "bad_api_key"), header
    check_bearer(f"Bearer {KEY}", (hash_key("other"), DIGEST))
    check_bearer(f"bearer  {KEY} ", (DIGEST,))


def test_beyond_loopback_needs_keys():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host)
        require_keys_for(host, ())
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match=f"refusing to serve on {host} without API keys"):
            require_keys_for(host, ())
        require_keys_for(host, (DIGEST,))


def test_serve_cli_refuses_a_public_address_without_keys_before_ray_starts(tmp_path):
    from helpers import medcae_subprocess  # fails the command if Ray was imported

    cmd = [sys.executable, "-m", "medcae", "serve", "--bundle", str(tmp_path), "--host"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = medcae_subprocess("serve", "--bundle", str(tmp_path), "--host", "0.0.0.0")
    assert out.returncode == 2, out.stderr
    text = out.stdout + out.stderr
    assert "refusing to serve on 0.0.0.0 without API keys" in text and "--api-keys-file" in text
    assert "Traceback" not in text
    digest = subprocess.run(
        [sys.executable, "-m", "medcae", "hash-key"],
        input=KEY + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert digest.stdout.strip() == DIGEST
    # With a key, every interface still needs the host names clients use (DNS rebinding).
    keyed = subprocess.run(
        [*cmd, "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env | {"MEDCAE_API_KEY_SHA256": DIGEST},
    )
    text = keyed.stdout + keyed.stderr
    assert keyed.returncode != 0 and "--allowed-hosts" in text and "Traceback" not in text


def test_named_keys_with_roles_each_may_what_its_role_allows(tmp_path):
    from medcae.serving.auth import LOCAL_USER, authorize, key_line, load_keys

    keys = tmp_path / "keys"
    keys.write_text(
        f"{key_line('p-secret')}  # a plain digest: a predict key\n"
        f"{key_line('l-secret', 'alice', 'label')}\n"
        f"{key_line('a-secret', 'ops.admin', 'admin')}\n"
    )
    loaded = load_keys(keys)
    assert [(k.name, k.role) for k in loaded] == [
        (f"key:{loaded[0].digest[:8]}", "predict"),
        ("alice", "label"),
        ("ops.admin", "admin"),
    ]
    assert authorize("Bearer l-secret", loaded, "label").name == "alice"
    assert authorize("Bearer a-secret", loaded, "admin").role == "admin"
    assert authorize("Bearer p-secret", loaded, "predict").role == "predict"
    with pytest.raises(RequestError) as err:
        authorize("Bearer l-secret", loaded, "admin")
    assert err.value.status == 403 and "alice has the role label; this needs admin" in str(
        err.value
    )
    with pytest.raises(RequestError) as err:
        authorize("Bearer p-secret", loaded, "label")
    assert err.value.status == 403
    with pytest.raises(RequestError) as err:
        authorize(None, loaded, "predict")
    assert err.value.status == 401
    assert authorize(None, (), "admin") == LOCAL_USER  # no keys (loopback only): every role
    keys.write_text(f"{key_line('x')} role=root\n")
    with pytest.raises(ConfigError, match=r"line 1: role 'root': expected one of predict, label"):
        load_keys(keys)
    keys.write_text(f"{key_line('x')} owner=bob\n")
    with pytest.raises(ConfigError, match=r"line 1: 'owner=bob': expected the digest, then"):
        load_keys(keys)
    out = subprocess.run(
        [sys.executable, "-m", "medcae", "hash-key", "--name", "bob", "--role", "admin"],
        input="k3y\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.stdout.strip() == key_line("k3y", "bob", "admin")
