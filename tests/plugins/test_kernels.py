"""The Triton kernels on the CPU (TRITON_INTERPRET=1) against the numpy reference.

All cases run in one subprocess (``tests.plugins.worker kernels``) so that the interpreter is
switched on before triton is first imported, whatever this pytest process imported already.
"""

from __future__ import annotations

import json

import pytest

from tests.plugins import run_worker
from tests.plugins.worker import OTHER_CASES, SELECT_CASES


@pytest.fixture(scope="module")
def results() -> dict:
    proc = run_worker("kernels", interpret=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_select_and_scatter_match_reference(results, case):
    """idx (int64, CLS first, lower index on ties), both gathers and the scatter, bitwise."""
    r = results[case]
    assert r["ok"], r["detail"]


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_other_cases(results, case):
    """Hand-written ties, scatter with duplicate/all/one rows, ValueErrors, gpu_check smoke."""
    r = results[case]
    assert r["ok"], r["detail"]


def test_cases_cover_the_bounds():
    """The case table keeps K=1, K=N-1, odd N, B=1 and B=3, fp16 and tie cases."""
    ks = {(n, k) for _, n, _, k, _, _ in SELECT_CASES.values()}
    assert any(k == 1 for _, k in ks) and any(k == n - 1 for n, k in ks)
    assert any(n % 2 for n, _ in ks)
    assert {b for b, *_ in SELECT_CASES.values()} >= {1, 3}
    assert {d for *_, d, _ in SELECT_CASES.values()} == {"float32", "float16"}
    assert {"zeros", "few", "signed_zero"} <= {kind for *_, kind in SELECT_CASES.values()}
