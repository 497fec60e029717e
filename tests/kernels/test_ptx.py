"""Every Triton kernel compiles for sm_90 (no GPU needed); region_attention moves rows as 16-byte vectors.

Runs the compiler in a subprocess with TRITON_INTERPRET=0 (this process interprets). A head dim
passed at run time once made every bf16 row load scalar (ld.global.b16); this guards that.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = """
import json
from idflux.bench_perf.ptx import region_attention_report
print(json.dumps(region_attention_report("bf16", 64, 90)))
"""


def _has_nvidia_backend():
    import torch

    if torch.cuda.is_available():  # a CUDA machine compiles and runs the kernels for real (GPU tests)
        return False
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


def _compile_report(script: str) -> dict:
    """Run ``script`` (prints one JSON line) with the compiler on (TRITON_INTERPRET=0) from the repo root."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _has_nvidia_backend(), reason="CUDA present (kernels run for real) or triton has no NVIDIA backend")
def test_region_attention_kernels_compile_for_sm90_with_vector_loads():
    report = _compile_report(SCRIPT)
    for name, ops in report.items():
        assert not any(k.startswith(("ld.global.b16", "ld.global.u16", "st.global.b16")) for k in ops), f"{name}: scalar bf16 accesses {ops}"
        vector = sum(v for k, v in ops.items() if ".v4." in k or k.startswith("cp.async"))
        assert vector > 0, f"{name}: no 16-byte loads or async copies {ops}"
        if "[atomic" in name:  # the one-kernel backward (BWD_DKDV auto, ArcFace launch): 16-byte fp32 atomics
            assert any(k.startswith(("atom.", "red.")) and ".v4." in k for k in ops), f"{name}: {ops}"
        else:
            assert not any(k.startswith(("atom.", "red.")) for k in ops), f"{name}: atomics in the key-parallel backward {ops}"


OTHERS = """
import json
from idflux.bench_perf.ptx import cosine_infonce_report, face_warp_report
sm80 = {"sm80" + k: v for k, v in face_warp_report("fp32", 80).items()}
print(json.dumps({**cosine_infonce_report("bf16", 90), **face_warp_report("bf16", 90), **sm80}))
"""


@pytest.mark.skipif(not _has_nvidia_backend(), reason="CUDA present (kernels run for real) or triton has no NVIDIA backend")
def test_cosine_infonce_and_face_warp_kernels_compile_for_sm90():
    report = _compile_report(OTHERS)
    # 4 cosine_infonce kernels (the backward also with N = 1 specialised); 7 face_warp variants (fit with status/index/table, its affine form, the
    # matrices-only fit and the fit with its size-1 arguments specialised, forward, scatter and gather
    # backward) for sm_90 and again for sm_80
    assert len(report) == 5 + 2 * 7, sorted(report)
    assert any(".v4." in k for k in report["_face_warp_bwd_gather_kernel"]), "the gather backward stores 16-byte vectors"
    assert not any(k.startswith(("atom.", "red.")) for k in report["_face_warp_bwd_gather_kernel"]), "no atomics in the gather"
    assert any(k.startswith("cp.async") for k in report["_cosine_infonce_shared_fwd_kernel"]), "bank tiles copied asynchronously"


USAGE = """
import json
from idflux.bench_perf.ptx import cosine_infonce_ptx, resource_usage
ptx = cosine_infonce_ptx("bf16", 90)
print(json.dumps({k: resource_usage(v) for k, v in ptx.items() if "merge" in k or "bwd" in k}))
"""


@pytest.mark.skipif(not _has_nvidia_backend(), reason="CUDA present (kernels run for real) or triton has no NVIDIA backend")
def test_ptxas_reports_registers_and_spills():
    report = _compile_report(USAGE)
    assert set(report) == {"_cosine_infonce_merge_kernel", "_cosine_infonce_bwd_kernel", "_cosine_infonce_bwd_kernel[ones]"}
    for name, usage in report.items():
        assert set(usage) == {"registers", "spill_stores", "spill_loads", "smem"}
        assert 16 <= usage["registers"] <= 255, (name, usage)
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"{name} spills: {usage}"


REGION_REGS = """
import json, sys
from idflux.bench_perf.ptx import region_attention_ptx, resource_usage
ptx = region_attention_ptx("bf16", int(sys.argv[1]), 90)
print(json.dumps({k: {**resource_usage(v), "warps": v.num_warps, "shared": v.shared} for k, v in ptx.items()}))
"""


@pytest.mark.skipif(not _has_nvidia_backend(), reason="CUDA present (kernels run for real) or triton has no NVIDIA backend")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_region_attention_bf16_registers_and_spills(head_dim):
    """Issue 16, item 6: no bf16 spills at head dims 64 and 128 under triton 3.6 (the GPU image's; the
    committed report, idflux/bench_perf/results/ptx_sm90_triton3.6.0.txt). Other triton versions
    allocate differently (3.9 spills 64-76 B per thread in two D = 128 kernels): there the bound is
    that nothing spills at D = 64 and nothing at D = 128 returns to the 4-warp atomic backward's
    212 B."""
    report = _compile_report(REGION_REGS.replace("int(sys.argv[1])", str(head_dim)))
    assert len(report) == 4, sorted(report)
    strict = head_dim == 64 or triton.__version__.startswith("3.6.")
    for name, usage in report.items():
        limit = 0 if strict else 128
        assert usage["spill_stores"] <= limit and usage["spill_loads"] <= 2 * limit, f"{name} spills: {usage}"
        assert usage["shared"] > 0, f"{name}: no pipelined shared memory reported {usage}"
    assert report["_region_attention_bwd[atomic, 4x8 keys]"]["warps"] == (8 if head_dim > 64 else 4)
    assert report["_region_attention_fwd"]["warps"] == 4


def test_blocks_per_sm_arithmetic():
    from idflux.bench_perf.ptx import blocks_per_sm

    # sm_90: 65536 registers; registers are allocated per warp in units of 256
    assert blocks_per_sm(255, 4, 0) == (2, "registers")      # 8192 per warp x 4 = 32768 per block
    assert blocks_per_sm(207, 4, 0) == (2, "registers")      # 6656 x 4 = 26624 -> 2.46
    assert blocks_per_sm(168, 4, 0) == (3, "registers")      # 5376 x 4 = 21504 -> 3.05
    assert blocks_per_sm(255, 8, 0) == (1, "registers")
    assert blocks_per_sm(16, 4, 0) == (16, "threads")        # 2048 threads / 128
    assert blocks_per_sm(32, 4, 100_000) == (2, "shared memory")  # 233472 // 101024
    assert blocks_per_sm(32, 1, 0) == (32, "blocks")
    assert blocks_per_sm(32, 4, 100_000, arch=80) == (1, "shared memory")  # 164 KB on sm_80


def test_backward_warps_follow_the_head_dim():
    from idflux.kernels.region_attention import _bwd_warps

    assert _bwd_warps(True, 128, False) == 8 and _bwd_warps(True, 64, False) == 4
    assert _bwd_warps(False, 128, False) == 4 and _bwd_warps(True, 128, True) == 8  # fp32: 8 warps anyway
