"""The graph path's compiled helpers get one specialisation per heap type, not one per literal argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

_SCRIPT = r"""
import json
import numba
from kvaccel.kernels import attention_index, attention_index_graph, attention_index_heap, attention_index_search

attention_index.compile_kernels(("graph",))
print(json.dumps({name: [str(sig) for sig in d.signatures]
                  for m in (attention_index_graph, attention_index_heap, attention_index_search)
                  for name, d in vars(m).items()
                  if isinstance(d, numba.core.registry.CPUDispatcher) and d.__module__ == m.__name__}))
"""


def test_graph_helpers_compile_once_per_heap_type(tmp_path):
    """In a fresh process, compiling the graph path (build, link, grouped search) compiles every helper once, with no
    literal-typed argument (a counter started at a literal ``0`` or ``-1`` is a type of its own, so numba compiled
    ``_push`` 9 times, ``_pop`` / ``_add_candidate`` 4, ``_add_edge`` / ``_push_grow`` 3). ``_push`` / ``_pop`` twice:
    the float32 heaps of the searches and the float64 weight heap of the projection."""
    # an empty numba cache: kernels loaded from a populated one register only the signatures they were loaded with
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sigs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [f"{n}{s}" for n, ss in sigs.items() for s in ss if "Literal" in s] == []
    counts = {name: len(ss) for name, ss in sigs.items() if ss}
    want = {"_push": 2, "_pop": 2, "_push_grow": 1, "_sort_desc": 1, "_write_results": 1, "_add_candidate": 1,
            "_add_edge": 1, "_flood": 1, "_prune_insert": 1, "_attach": 1, "_beam_search": 1, "_scan_row": 1,
            "_group_search": 1, "_search_groups": 1, "_project": 1, "_connect": 1, "_insert_rows": 1}
    assert counts == want
    heap_dtypes = {s.split(",")[0] for s in sigs["_push"]}
    assert heap_dtypes == {"(Array(float32", "(Array(float64"}, sigs["_push"]
