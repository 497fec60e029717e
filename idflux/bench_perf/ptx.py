"""Compile our Triton kernels for a CUDA target without a GPU and summarise their global memory
instructions (``python -m idflux.bench_perf.ptx [--op OP] [--dtype bf16] [--arch 90]``).

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


def generic_signature(fn, pointers: dict[str, str], constexprs: dict, floats: tuple = (), ones: tuple = ()):
    """(signature, constexprs, attrs) as a launch specialises it: every ``*_ptr`` argument typed from
    ``pointers`` (default ``*fp32``) and 16-byte aligned; ``ones`` (unit strides) as the constant 1;
    ``floats`` as fp32 scalars; other integers i32, strides and sizes divisible by 16 (the shapes
    that matter: 512-wide embeddings, 1024^2 images)."""
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in constexprs:
            sig[name], const[name] = "constexpr", constexprs[name]
        elif name in ones:
            sig[name], const[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name in ("D", "H", "W"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def cosine_infonce_report(dtype: str = "bf16", arch: int = 90) -> dict[str, dict[str, int]]:
    import importlib

    C = importlib.import_module("idflux.kernels.cosine_infonce")  # the module (the package exports the function)
    inputs = {n: f"*{dtype}" for n in ("g_ptr", "pos_ptr", "bank_ptr")}
    ints = {"idx_ptr": "*i64", "ids_ptr": "*i64", "nid_ptr": "*i64"}
    flags = dict(IN_BATCH=True, HAS_IDS=True, HAS_NEG_IDS=True)
    unit = ("stride_gd", "stride_pd", "stride_bd")
    floats = ("inv_tau", "eps")
    cases = {
        "_cosine_infonce_fwd_kernel": (C._cosine_infonce_fwd_kernel, dict(HAS_INDEX=True, BLOCK_M=16, BLOCK_D=512, **flags), 4),
        "_cosine_infonce_shared_fwd_kernel": (C._cosine_infonce_shared_fwd_kernel,
                                              dict(BLOCK_R=16, BLOCK_M=32, BLOCK_D=512, IEEE=dtype == "fp32", **flags), 8),
        "_cosine_infonce_merge_kernel": (C._cosine_infonce_merge_kernel, dict(BLOCK_S=16, BLOCK_D=512), 4),
        "_cosine_infonce_bwd_kernel": (C._cosine_infonce_bwd_kernel,
                                       dict(NEED_G=True, NEED_POS=True, IN_BATCH=True, BLOCK_N=16, BLOCK_D=512), 4),
        # one row, and the upstream gradient of a mean (stride 0): size-1 integers become constants
        "_cosine_infonce_bwd_kernel[ones]": (C._cosine_infonce_bwd_kernel,
                                             dict(NEED_G=True, NEED_POS=True, IN_BATCH=True, BLOCK_N=16, BLOCK_D=512, N=1), 4),
    }
    grads = {"grad_g_ptr": f"*{dtype}", "grad_pos_ptr": f"*{dtype}"}
    out = {}
    for name, (fn, constexprs, warps) in cases.items():
        sig = generic_signature(fn, {**inputs, **ints, **grads}, constexprs, floats, unit + ("stride_im",))
        out[name] = memory_ops(compile_ptx(fn, *sig, arch=arch, num_warps=warps))
    return out


def face_warp_report(dtype: str = "bf16", arch: int = 90) -> dict[str, dict[str, int]]:
    import importlib

    fw = importlib.import_module("idflux.kernels.face_warp")  # the module (the package exports the function)
    images = {n: f"*{dtype}" for n in ("img_ptr", "out_ptr", "gout_ptr")}
    ints = {"idx_ptr": "*i64", "idx_out_ptr": "*i32", "order_ptr": "*i64", "start_ptr": "*i64", "flag_ptr": "*i8"}
    floats = ("lo", "out_scale", "scale", "min_spread", "ratio_bound", "min_corr")
    fit = dict(BLOCK_F=32, FULL=True, OUTSIDE=True, SUPPORT=2.0)
    cases = {
        "_face_warp_fit_kernel": (fw._face_warp_fit_kernel, {}, dict(AFFINE=False, **fit)),
        "_face_warp_fit_kernel[affine]": (fw._face_warp_fit_kernel, {}, dict(AFFINE=True, **fit)),
        "_face_warp_fit_kernel[matrices only]": (fw._face_warp_fit_kernel, {},
                                                 dict(AFFINE=False, BLOCK_F=32, FULL=False, OUTSIDE=False, SUPPORT=1.0)),
        # Integer arguments equal to 1 are specialised to constants by a launch: a 1-pixel crop,
        # one image, one face.
        "_face_warp_fit_kernel[ones]": (fw._face_warp_fit_kernel, {}, dict(AFFINE=False, S=1, n_images=1, F=1, **fit)),
        "_face_warp_fwd_kernel": (fw._face_warp_fwd_kernel, {}, dict(BICUBIC=True, BLOCK=128)),
        "_face_warp_bwd_kernel": (fw._face_warp_bwd_kernel, {}, dict(BICUBIC=True, BLOCK=128)),
        "_face_warp_bwd_gather_kernel": (fw._face_warp_bwd_gather_kernel, {"gimg_ptr": f"*{dtype}"},
                                         dict(BICUBIC=True, TILE_H=16, TILE_W=64, BLOCK_C=4)),
    }
    out = {}
    for name, (fn, extra, constexprs) in cases.items():
        sig = generic_signature(fn, {**images, **ints, **extra}, constexprs, floats)
        out[name] = memory_ops(compile_ptx(fn, *sig, arch=arch))
    return out


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
    p.add_argument("--op", default="all", choices=("all", "region_attention", "cosine_infonce", "face_warp"))
    args = p.parse_args(argv)
    reports = []
    if args.op in ("all", "region_attention"):
        reports.append(region_attention_report(args.dtype, args.head_dim, args.arch))
    if args.op in ("all", "cosine_infonce"):
        reports.append(cosine_infonce_report(args.dtype, args.arch))
    if args.op in ("all", "face_warp"):
        reports.append(face_warp_report(args.dtype, args.arch))
    for report in reports:
        for name, ops in report.items():
            print(f"{name:<34} " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
