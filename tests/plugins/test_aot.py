"""AOT compilation of both kernels to PTX and cubin for sm_80/86/89/90 (on the CPU).

Runs in a subprocess with TRITON_INTERPRET removed and an empty triton cache, so the
kernels are really compiled (a few seconds in all).
"""

from __future__ import annotations

import json

import pytest

from tests.plugins import run_worker
from tests.plugins.worker import AOT_CASES, AOT_SM

# (input pointers, int32 scalars, output pointers) + triton's two scratch pointers
SELECT_PARAMS = ["u64"] * 3 + ["u32"] * 3 + ["u64"] * 3 + ["u64"] * 2
SCATTER_PARAMS = ["u64"] * 3 + ["u32"] * 3 + ["u64"] + ["u64"] * 2


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("triton_cache")
    proc = run_worker("aot", interpret=False, extra_env={"TRITON_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(AOT_CASES))
def test_compiles(results, case):
    assert results[case]["ok"], results[case]["detail"]


@pytest.mark.parametrize("sm", AOT_SM)
def test_ptx_and_cubin(results, sm):
    detail = results[f"sm{sm}"]["detail"]
    for key, params in (("select", SELECT_PARAMS), ("scatter", SCATTER_PARAMS)):
        kb = detail[key]
        assert kb["name"] == f"idle_{key}_kernel"
        assert kb["has_version"] and kb["has_entry"] and kb["ptx_bytes"] > 1000
        assert kb["target"].startswith(f"sm_{sm}")  # sm_90 compiles for sm_90a
        assert kb["elf"] and kb["cubin_bytes"] > 1000
        assert kb["threads"] == 128 and 0 <= kb["shared"] <= 48 * 1024
        assert kb["params"] == params


def test_ptx_version_option(results):
    detail = results["sm80_fp16_ptx80"]["detail"]
    assert detail["select"]["version"] == 80 and detail["scatter"]["version"] == 80


def test_deit_small_shape(results):
    """DeiT-S (N=197, C=384, K=137) compiles within the 48 KiB shared-memory budget."""
    detail = results["sm89_deit_s"]["detail"]
    assert detail["select"]["shared"] <= 48 * 1024 and detail["select"]["elf"]
    assert detail["scatter"]["shared"] <= 48 * 1024 and detail["scatter"]["elf"]
