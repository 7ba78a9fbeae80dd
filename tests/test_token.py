"""The API token: from the environment, else generated once into an owner-only file."""

from __future__ import annotations

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
