"""How the attention index's numba kernels are compiled and where their machine code is cached.

Every kernel is ``numba.njit(cache=True, nogil=True, ...)`` through :func:`kernel`, cached on disk in
:func:`cache_dir`: the user's ``NUMBA_CACHE_DIR`` when set, else a per-user directory
(``$XDG_CACHE_HOME/kvaccel/numba``, ``~/.cache/kvaccel/numba`` without ``XDG_CACHE_HOME``), which stays writable when
the installed package (site-packages) is not; if that cannot be written either, ``<tempdir>/kvaccel-numba-<user>``.
The directory is applied to these kernels only (numba's setting is restored after each decoration), so other numba
code in the process keeps its own cache location.
"""

from __future__ import annotations

import functools
import getpass
import os
import tempfile
import threading
import warnings
from collections.abc import Callable

import numba
from numba.core import config as _numba_config

_DECORATE = threading.Lock()


def _writable(path: str) -> bool:
    """``path`` exists (created if needed) and a file can be created in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def default_cache_dir() -> str:
    """The per-user cache directory: ``$XDG_CACHE_HOME/kvaccel/numba``, or ``~/.cache/kvaccel/numba``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvaccel", "numba")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (e.g. a container)
        return str(os.getuid()) if hasattr(os, "getuid") else "user"


@functools.cache
def cache_dir() -> str | None:
    """Where the kernels' compiled code is cached: ``NUMBA_CACHE_DIR`` if the user set it (numba's own setting, used
    as is), else the first writable of :func:`default_cache_dir` and ``<tempdir>/kvaccel-numba-<user>``; ``None``
    (with a ``RuntimeWarning``: every new process compiles again) when neither can be written."""
    if _numba_config.CACHE_DIR:
        return _numba_config.CACHE_DIR
    for path in (default_cache_dir(), os.path.join(tempfile.gettempdir(), f"kvaccel-numba-{_user()}")):
        if _writable(path):
            return path
    warnings.warn(f"kvaccel: neither {default_cache_dir()} nor the temporary directory is writable, so the retrieval "
                  "kernels are compiled again in every new process (~10 s); set NUMBA_CACHE_DIR to a writable "
                  "directory to cache them", RuntimeWarning, stacklevel=2)
    return None


def kernel(**options) -> Callable:
    """``numba.njit(cache=True, nogil=True, **options)`` with the on-disk cache in :func:`cache_dir` (numba picks a
    function's cache location when it is decorated; its global setting is restored afterwards)."""
    path = cache_dir()

    def decorate(fn: Callable):
        with _DECORATE:
            before = _numba_config.CACHE_DIR
            _numba_config.CACHE_DIR = path or ""
            try:
                return numba.njit(cache=path is not None, nogil=True, **options)(fn)
            finally:
                _numba_config.CACHE_DIR = before

    return decorate
