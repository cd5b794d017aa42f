"""The one registry client's settings: one pair (registry_url / registry_token), old names as aliases."""

from __future__ import annotations

import pytest

from e2vpt.config import Settings
from e2vpt.registry.client import RegistryClient


def test_training_setting_names_are_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2VPT_REGISTER_URL", "http://legacy:9/")
    monkeypatch.setenv("E2VPT_REGISTER_TOKEN", "old-token")
    monkeypatch.setenv("E2VPT_REGISTER_TIMEOUT_S", "7")
    settings = Settings()
    assert settings.registry_url == "http://legacy:9/" and settings.registry_token == "old-token"
    assert settings.registry_client_timeout == 7.0
    client = RegistryClient.from_settings(settings)
    try:
        assert client.url == "http://legacy:9" and client.http.headers["Authorization"] == "Bearer old-token"
    finally:
        client.close()
    # a value given in code wins over the environment, as for every other field
    assert Settings(registry_url="http://code:1").registry_url == "http://code:1"


def test_new_names_win_over_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2VPT_REGISTER_URL", "http://legacy:9")
    monkeypatch.setenv("E2VPT_REGISTRY_URL", "http://new:9")
    assert Settings().registry_url == "http://new:9"
