"""Where the attention index's numba kernels cache their compiled code: the user's NUMBA_CACHE_DIR when set, else a
per-user directory ($XDG_CACHE_HOME/kvaccel/numba), else a per-user temporary directory when that cannot be written,
else no cache with a warning; numba's own setting is left as it was."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="the index kernels need numba: pip install '.[retrieval]'")


@pytest.fixture
def jit(monkeypatch, tmp_path):
    """The jit module with a fresh cache_dir(), no user NUMBA_CACHE_DIR, XDG_CACHE_HOME and tempdir under tmp_path."""
    from kvaccel.kernels import attention_index_jit as jit

    monkeypatch.setattr(jit._numba_config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    jit.cache_dir.cache_clear()
    yield jit
    jit.cache_dir.cache_clear()


def _add(a, b):
    return a + b


def _cache_path(dispatcher) -> str:
    return dispatcher._cache._cache_path


def test_default_is_the_per_user_cache_dir_and_numba_setting_is_restored(jit, tmp_path):
    want = str(tmp_path / "xdg" / "kvaccel" / "numba")
    assert jit.cache_dir() == want
    f = jit.kernel()(_add)
    assert _cache_path(f).startswith(want + os.sep)
    assert jit._numba_config.CACHE_DIR == ""  # other numba code keeps numba's default locations
    assert f(2, 3) == 5
    assert any(name.endswith(".nbi") for name in os.listdir(_cache_path(f)))  # cached there


def test_home_cache_without_xdg(jit, monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert jit.cache_dir() == str(tmp_path / "home" / ".cache" / "kvaccel" / "numba")


def test_user_numba_cache_dir_is_respected(jit, monkeypatch, tmp_path):
    mine = str(tmp_path / "mine")
    monkeypatch.setattr(jit._numba_config, "CACHE_DIR", mine)
    assert jit.cache_dir() == mine
    assert _cache_path(jit.kernel()(_add)).startswith(mine + os.sep)
    assert jit._numba_config.CACHE_DIR == mine


def test_falls_back_to_a_temporary_dir_when_the_default_is_not_writable(jit, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # <file>/kvaccel/numba cannot be created (even as root)
    want = str(tmp_path / "tmp" / f"kvaccel-numba-{jit._user()}")
    assert jit.cache_dir() == want
    assert _cache_path(jit.kernel()(_add)).startswith(want + os.sep)


def test_no_writable_dir_warns_and_compiles_without_cache(jit, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))
    with pytest.warns(RuntimeWarning, match="NUMBA_CACHE_DIR"):
        assert jit.cache_dir() is None
    f = jit.kernel()(_add)
    assert f._cache.__class__.__name__ == "NullCache"
    assert f(2, 3) == 5


def test_index_kernels_cache_in_cache_dir():
    """Every kernel of the index modules caches in cache_dir() (before: kernels/__pycache__ next to the source,
    not writable in a read-only site-packages)."""
    import numba

    from kvaccel.kernels import (
        attention_index_attend,
        attention_index_graph,
        attention_index_heap,
        attention_index_scan,
        attention_index_search,
    )
    from kvaccel.kernels.attention_index_jit import cache_dir

    where = cache_dir()
    kernels = [obj for mod in (attention_index_attend, attention_index_graph, attention_index_heap,
                               attention_index_scan, attention_index_search)
               for obj in vars(mod).values() if isinstance(obj, numba.core.registry.CPUDispatcher)]
    assert len(kernels) >= 30
    for k in kernels:
        assert _cache_path(k).startswith(where + os.sep), k.__name__
