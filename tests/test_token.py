"""The API token: from the environment, else generated once into an owner-only file, atomically, whatever
the number of servers starting at once."""

from __future__ import annotations

import pytest

import multiprocessing as mp
import os
import stat

from longtake.serve import load_or_create_token


def test_token_generated_once_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv("LONGTAKE_API_TOKEN", raising=False)
    token, created = load_or_create_token(tmp_path)
    assert created and len(token) >= 32
    mode = stat.S_IMODE((tmp_path / "api_token").stat().st_mode)
    assert mode == 0o600
    again, created_again = load_or_create_token(tmp_path)
    assert again == token and not created_again


def test_token_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTAKE_API_TOKEN", "from-env")
    assert load_or_create_token(tmp_path) == ("from-env", False)
    assert not (tmp_path / "api_token").exists()


def _load(args):
    data_dir, barrier = args
    barrier.wait()
    return load_or_create_token(data_dir)


@pytest.mark.slow
def test_many_processes_starting_at_once_share_one_token(tmp_path, monkeypatch):
    monkeypatch.delenv("LONGTAKE_API_TOKEN", raising=False)
    ctx = mp.get_context("spawn")  # not fork: the test process may hold Ray threads and locks
    n = 8
    with ctx.Manager() as m:
        barrier = m.Barrier(n)
        with ctx.Pool(n) as pool:
            results = pool.map(_load, [(str(tmp_path), barrier)] * n)
    tokens = {t for t, _ in results}
    assert len(tokens) == 1 and sum(created for _, created in results) == 1
    path = tmp_path / "api_token"
    assert path.read_text().strip() == tokens.pop()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api_token"]  # no temporary file left
