"""Fixtures shared by the test modules."""

import pytest

from atm_jax.data import sources

import fakes


@pytest.fixture(scope="session")
def shared_bases(tmp_path_factory):
    """One folder of pretrained tiny bases for the whole session: a base is keyed by
    the SHA-256 of its config, so every test asking for the same tiny base trains it
    once (test_pretrain checks training and caching on their own caches)."""
    return tmp_path_factory.mktemp("bases")


@pytest.fixture
def fake_cache(tmp_path, monkeypatch, shared_bases):
    """An offline cache in tmp_path holding the fake mini-suite sources."""
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    sources._MEMO.clear()
    fakes.install_fake_suite()
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "bases").symlink_to(shared_bases, target_is_directory=True)
    yield tmp_path
    sources._MEMO.clear()
