"""Fixtures shared by the test modules."""

import pytest

from atm_jax.data import sources

import fakes


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An offline cache in tmp_path holding the fake mini-suite sources."""
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    sources._MEMO.clear()
    fakes.install_fake_suite()
    yield tmp_path
    sources._MEMO.clear()
