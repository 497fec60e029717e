"""Compile our Triton kernels for a CUDA target without a GPU and summarise their global memory
instructions (``python -m idflux.bench_perf.ptx [--op OP] [--dtype bf16] [--arch 90]``).

Triton's NVIDIA backend ships ptxas, so ``triton.compile`` produces PTX on any machine. The
signature passed here mirrors what a real launch specialises: pointers and strides divisible by
16, contiguous rows. The summary counts loads and stores by width: ``ld.global.v4`` (16-byte
vectors) and ``cp.async`` (asynchronous copies to shared memory, pipelined) are what a
bandwidth-bound kernel wants; scalar ``ld.global.b16`` on bf16 rows means a feature mask the
compiler could not fold (a head dim passed at run time instead of as a constant).

``--regs`` also assembles each kernel with the ptxas Triton ships (``ptxas -v``) and reports its
registers per thread, spill bytes and shared memory: spills on a hot loop are what a kernel change
must not add, and they are visible here without a GPU.

Must run with TRITON_INTERPRET=0 (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re

_MEM_OP = re.compile(r"(?<![\w.])(cp\.async\.\w+\.shared\.global|ld\.global[.\w]*|st\.global[.\w]*|atom\.global[.\w]*|red\.global[.\w]*)")


def region_attention_signature(fn, dtype: str, head_dim: int, *, atomic: bool = False, n_kv: int = 4 * 264,
                               n_refs: int = 4) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a region_attention kernel as a launch specialises it (by
    default the SigLIP branch's: 4 references x 264 keys)."""
    from idflux.kernels.region_attention import _BLOCK_M, _TAIL_N, _block_n

    sig, const, attrs = {}, {}, {}
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    ieee = dtype == "fp32"
    values = dict(BLOCK_M=_BLOCK_M, BLOCK_N=_block_n(n_kv, n_refs, ieee, head_dim), TAIL_N=_TAIL_N, BLOCK_D=block_d,
                  HEAD_D=head_dim, IEEE=ieee, ATOMIC_DKDV=atomic, ADD_OUT=atomic)
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


class KernelPTX(str):
    """A kernel's PTX, with what its launch needs beside registers: ``num_warps`` and the dynamic
    shared memory (``shared`` bytes, Triton's pipelined buffers) from the compiled metadata."""

    num_warps: int = 4
    shared: int = 0


def compile_ptx(fn, sig: dict, const: dict, attrs: dict, *, arch: int = 90, num_warps: int = 4) -> KernelPTX:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    out = KernelPTX(kernel.asm["ptx"])
    out.num_warps = num_warps
    out.shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    return out


#: Per-SM limits used by :func:`blocks_per_sm`: registers, threads, blocks, shared memory (bytes
#: usable by blocks), by SM version (CUDA occupancy tables: sm_80 164 KB, sm_90 228 KB of shared
#: memory per SM, 1 KB of it reserved per block).
_SM_LIMITS = {80: (65536, 2048, 32, 167936), 86: (65536, 1536, 16, 102400), 89: (65536, 1536, 24, 102400),
              90: (65536, 2048, 32, 233472)}


def blocks_per_sm(registers: int, num_warps: int, shared: int, arch: int = 90) -> tuple[int, str]:
    """(resident blocks per SM, the limiting resource) of a kernel with ``registers`` per thread,
    ``num_warps`` warps and ``shared`` bytes of shared memory per block. Registers are allocated per
    warp in units of 256."""
    regs_sm, threads_sm, blocks_sm, smem_sm = _SM_LIMITS.get(arch, _SM_LIMITS[90])
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = {"registers": regs_sm // (per_warp * num_warps), "threads": threads_sm // (32 * num_warps),
              "blocks": blocks_sm, "shared memory": smem_sm // (shared + 1024)}
    which = min(limits, key=limits.get)
    return limits[which], which


def _ptxas(arch: int) -> str:
    """The ptxas this triton's NVIDIA backend uses for ``arch`` (its choice differs across versions)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


_USAGE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def resource_usage(ptx: str) -> dict[str, int]:
    """Registers per thread, spill store/load bytes and static shared memory of ``ptx``'s kernel, from
    ``ptxas -v`` for the PTX's own target."""
    import subprocess
    import tempfile

    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    if target is None:
        raise ValueError("resource_usage: no .target line in the PTX")
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        arch = int(re.sub(r"\D", "", target.group(1)))
        proc = subprocess.run([_ptxas(arch), f"-arch={target.group(1)}", "-v", src, "-o", f"{tmp}/k.cubin"],
                              capture_output=True, text=True, check=True)
    out = proc.stderr + proc.stdout
    return {k: int(m.group(1)) if (m := rx.search(out)) else 0 for k, rx in _USAGE.items()}


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


def cosine_infonce_ptx(dtype: str = "bf16", arch: int = 90) -> dict[str, str]:
    import importlib

    C = importlib.import_module("idflux.kernels.cosine_infonce")  # the module (the package exports the function)
    inputs = {n: f"*{dtype}" for n in ("g_ptr", "pos_ptr", "bank_ptr")}
    ints = {"idx_ptr": "*i64", "ids_ptr": "*i64", "nid_ptr": "*i64"}
    flags = dict(IN_BATCH=True, HAS_IDS=True, HAS_NEG_IDS=True)
    unit = ("stride_gd", "stride_pd", "stride_bd")
    floats = ("inv_tau", "eps")
    shared_m, shared_warps = C._shared_tile(512, dtype == "fp32")  # the launch's tile at D = 512
    cases = {
        "_cosine_infonce_fwd_kernel": (C._cosine_infonce_fwd_kernel, dict(HAS_INDEX=True, BLOCK_M=16, BLOCK_D=512, **flags), 4),
        "_cosine_infonce_shared_fwd_kernel": (C._cosine_infonce_shared_fwd_kernel,
                                              dict(BLOCK_R=16, BLOCK_M=shared_m, BLOCK_D=512, IEEE=dtype == "fp32", **flags),
                                              shared_warps),
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
        out[name] = compile_ptx(fn, *sig, arch=arch, num_warps=warps)
    return out


def face_warp_ptx(dtype: str = "bf16", arch: int = 90) -> dict[str, str]:
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
                                         dict(BICUBIC=True, TILE_H=fw._TILE_H, TILE_W=fw._TILE_W, BLOCK_C=4)),
    }
    warps = {"_face_warp_bwd_gather_kernel": fw._GATHER_WARPS}
    out = {}
    for name, (fn, extra, constexprs) in cases.items():
        sig = generic_signature(fn, {**images, **ints, **extra}, constexprs, floats)
        out[name] = compile_ptx(fn, *sig, arch=arch, num_warps=warps.get(name, 4))
    return out


def region_attention_ptx(dtype: str = "bf16", head_dim: int = 64, arch: int = 90) -> dict[str, str]:
    """PTX of each region_attention kernel as launched: the SigLIP branch's (4 x 264 keys) forward,
    dq and dk/dv kernels, and the one-kernel atomic backward that the ArcFace branch (4 x 8 keys)
    takes on a GPU (``BWD_DKDV="auto"``)."""
    from idflux.kernels import _region_attention_triton as K
    from idflux.kernels.region_attention import _bwd_warps, _num_warps

    cases = {name: (name, {}) for name in ("_region_attention_fwd", "_region_attention_bwd", "_region_attention_bwd_dkdv")}
    cases["_region_attention_bwd[atomic, 4x8 keys]"] = ("_region_attention_bwd", dict(atomic=True, n_kv=32, n_refs=4))
    out = {}
    for label, (name, kw) in cases.items():
        fn = getattr(K, name)
        warps = (_bwd_warps(kw.get("atomic", False), head_dim, dtype == "fp32") if name == "_region_attention_bwd"
                 else _num_warps(dtype == "fp32"))  # as the launcher picks them
        out[label] = compile_ptx(fn, *region_attention_signature(fn, dtype, head_dim, **kw), arch=arch, num_warps=warps)
    return out


def region_attention_report(dtype: str = "bf16", head_dim: int = 64, arch: int = 90) -> dict[str, dict[str, int]]:
    """Global memory instruction counts of each region_attention kernel."""
    return {k: memory_ops(v) for k, v in region_attention_ptx(dtype, head_dim, arch).items()}


def cosine_infonce_report(dtype: str = "bf16", arch: int = 90) -> dict[str, dict[str, int]]:
    """Global memory instruction counts of each cosine_infonce kernel variant."""
    return {k: memory_ops(v) for k, v in cosine_infonce_ptx(dtype, arch).items()}


def face_warp_report(dtype: str = "bf16", arch: int = 90) -> dict[str, dict[str, int]]:
    """Global memory instruction counts of each face_warp kernel variant."""
    return {k: memory_ops(v) for k, v in face_warp_ptx(dtype, arch).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 (A100), 90 (H100/H200)")
    p.add_argument("--op", default="all", choices=("all", "region_attention", "cosine_infonce", "face_warp"))
    p.add_argument("--regs", action="store_true", help="also report registers, spills and shared memory (ptxas -v)")
    args = p.parse_args(argv)
    kernels = {}
    if args.op in ("all", "region_attention"):
        kernels.update(region_attention_ptx(args.dtype, args.head_dim, args.arch))
    if args.op in ("all", "cosine_infonce"):
        kernels.update(cosine_infonce_ptx(args.dtype, args.arch))
    if args.op in ("all", "face_warp"):
        kernels.update(face_warp_ptx(args.dtype, args.arch))
    for name, ptx in kernels.items():
        line = f"{name:<36} " + ", ".join(f"{k} x{v}" for k, v in sorted(memory_ops(ptx).items()))
        if args.regs:
            u = resource_usage(ptx)
            warps, shared = getattr(ptx, "num_warps", 4), getattr(ptx, "shared", 0) + u["smem"]
            blocks, limit = blocks_per_sm(u["registers"], warps, shared, args.arch)
            line += (f"\n{'':<36} {u['registers']} registers, spills {u['spill_stores']}/{u['spill_loads']} B"
                     f" (store/load), {shared} B smem, {warps} warps: {blocks} blocks per SM ({limit})")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
