"""API keys (serve/keys.py) and `longtake keys`: hashed on disk, owner-only, seen by a running server
without a restart, revocable; the single token of earlier versions is an admin key."""

from __future__ import annotations

import json

import pytest

from longtake.cli import main
from longtake.request import RequestError
from longtake.serve.keys import LEGACY, KeyStore, digest


def test_keys_are_stored_hashed_and_seen_at_once(tmp_path):
    server = KeyStore(tmp_path, legacy_token="old-token")  # what a running ingress holds
    assert server.lookup("lt_anything") is None
    cli = KeyStore(tmp_path)
    alice = cli.add("alice", max_jobs=3)
    boss = cli.add("boss", admin=True)
    assert alice.startswith("lt_") and len(alice) > 40 and alice != boss
    text = (tmp_path / "api_keys.json").read_text()
    assert alice not in text and boss not in text and digest(alice) in text
    assert (tmp_path / "api_keys.json").stat().st_mode & 0o777 == 0o600
    got = server.lookup(alice)
    assert (got.name, got.admin, got.max_jobs) == ("alice", False, 3)
    assert server.lookup(boss).admin and server.lookup(alice + "x") is None
    assert server.lookup("old-token").name == LEGACY and server.lookup("old-token").admin
    cli.revoke("alice")  # a new file (a rename): the server sees it at the next request
    assert server.lookup(alice) is None and server.lookup(boss) is not None
    assert [c.name for c in server.list()] == ["boss"]


@pytest.mark.parametrize("name,kw,field", [("Alice", {}, "name"), ("", {}, "name"), ("a b", {}, "name"),
                                          ("x" * 64, {}, "name"), (LEGACY, {}, "name"), ("ok", {"max_jobs": 0}, "max_jobs")])
def test_bad_key_names_and_limits_are_refused(tmp_path, name, kw, field):
    with pytest.raises(RequestError) as e:
        KeyStore(tmp_path).add(name, **kw)
    assert e.value.field == field
    assert not (tmp_path / "api_keys.json").exists()


def test_a_name_is_taken_until_revoked(tmp_path):
    store = KeyStore(tmp_path)
    first = store.add("studio")
    with pytest.raises(RequestError, match="revoke it first"):
        store.add("studio")
    with pytest.raises(RequestError, match="the name of a key"):
        store.revoke("nobody")
    store.revoke("studio")
    second = store.add("studio")
    assert store.lookup(first) is None and store.lookup(second).name == "studio"


def test_keys_cli(tmp_path, capsys):
    d = str(tmp_path)
    assert main(["keys", "add", "alice", "--max-jobs", "2", "--data-dir", d]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyStore(d).lookup(key).max_jobs == 2
    assert main(["keys", "add", "boss", "--admin", "--data-dir", d]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--json", "--data-dir", d]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["admin"], k["max_jobs"]) for k in listed] == [("alice", False, 2), ("boss", True, 4)]
    assert key not in json.dumps(listed) and "sha256" not in listed[0]
    assert main(["keys", "revoke", "alice", "--data-dir", d]) == 0
    assert main(["keys", "revoke", "alice", "--data-dir", d]) == 2
    assert "name: got 'alice'" in capsys.readouterr().err
    assert KeyStore(d).lookup(key) is None
