"""Compile our Triton kernels for a CUDA target without a GPU and summarise their global memory
instructions (``python -m idflux.bench_perf.ptx``).

Triton's NVIDIA backend ships ptxas, so ``triton.compile`` produces PTX on any machine. The
signature passed here mirrors what a real launch specialises: pointers and strides divisible by
16, contiguous rows. The summary counts loads and stores by width: ``ld.global.v4`` (16-byte
vectors) and ``cp.async`` (asynchronous copies to shared memory, pipelined) are what a
bandwidth-bound kernel wants; scalar ``ld.global.b16`` on bf16 rows means a feature mask the
compiler could not fold (a head dim passed at run time instead of as a constant).

Must run with TRITON_INTERPRET=0 (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re

_MEM_OP = re.compile(r"(?<![\w.])(cp\.async\.\w+\.shared\.global|ld\.global[.\w]*|st\.global[.\w]*|atom\.global[.\w]*|red\.global[.\w]*)")


def region_attention_signature(fn, dtype: str, head_dim: int, *, atomic: bool = False) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a region_attention kernel as a launch specialises it."""
    sig, const, attrs = {}, {}, {}
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    values = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, HEAD_D=head_dim, IEEE=dtype == "fp32", ATOMIC_DKDV=atomic,
                  ADD_OUT=atomic)
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in values:
            sig[name], const[name] = "constexpr", values[name]
            continue
        if name.startswith("stride"):
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("R", "NB", "SPLIT"):
            sig[name] = "i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:  # pointers
            if name in ("LSE", "DELTA"):
                sig[name] = "*fp32"
            elif name in ("DK", "DV"):
                sig[name] = "*fp32" if atomic else f"*{dtype}"  # atomic: the fp32 accumulators
            elif name == "OFFS":
                sig[name] = "*i64"
            elif name in ("MEM", "TILES", "ROWS", "REF_TILES", "REF_COUNTS"):
                sig[name] = "*i32"
            else:
                sig[name] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def compile_ptx(fn, sig: dict, const: dict, attrs: dict, *, arch: int = 90, num_warps: int = 4) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm["ptx"]


def memory_ops(ptx: str) -> dict[str, int]:
    """Count of each global load/store/atomic/async-copy instruction form in ``ptx``."""
    return dict(collections.Counter(_MEM_OP.findall(ptx)))


def region_attention_report(dtype: str = "bf16", head_dim: int = 64, arch: int = 90) -> dict[str, dict[str, int]]:
    from idflux.kernels import _region_attention_triton as K

    out = {}
    for name in ("_region_attention_fwd", "_region_attention_bwd", "_region_attention_bwd_dkdv"):
        fn = getattr(K, name)
        out[name] = memory_ops(compile_ptx(fn, *region_attention_signature(fn, dtype, head_dim), arch=arch))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 (A100), 90 (H100/H200)")
    args = p.parse_args(argv)
    for name, ops in region_attention_report(args.dtype, args.head_dim, args.arch).items():
        print(f"{name:<28} " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
