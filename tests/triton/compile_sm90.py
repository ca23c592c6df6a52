"""Compile every Triton kernel for sm_90 on a machine without a GPU: frontend, LLVM, ptxas.

The interpreter never lowers kernels, so this catches what only the compiler rejects (globals
that are not constexpr, type changes across branches, unsupported ops). Run it without
TRITON_INTERPRET; it prints one line per kernel and exits non-zero on the first failure.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from saeformer.kernels import triton_sparse, triton_topk

TARGET = GPUTarget("cuda", 90, 32)
INTS = ("n", "k", "d", "n_cols", "n_entries")


def arg_type(name: str, dtype: str) -> str:
    """Signature type of a kernel argument: ints, strides, index and value pointers."""
    if name in INTS or name.startswith("stride"):
        return "i32"
    if name in ("idx_ptr", "cand_ptr", "latent_ptr", "perm_ptr"):
        return "*i64"
    if name == "keep_ptr":
        return "*i1"
    return f"*{dtype}"


def compile_one(fn, dtype: str, consts: dict, num_warps: int = 4, **types: str) -> None:
    """Compile `fn` with the given constexprs; `types` overrides argument types."""
    sig = {a: types.get(a, arg_type(a, dtype)) for a in fn.arg_names}
    sig |= {a: "constexpr" for a in consts}
    triton.compile(ASTSource(fn, sig, consts), target=TARGET, options={"num_warps": num_warps})
    print(f"ok {fn.__name__} {dtype} {consts}")


def main() -> None:
    """Each kernel in the configurations its launcher picks, for fp32 and bf16."""
    for dt in ("fp32", "bf16"):
        topk = triton_topk._topk_tile_kernel
        for from_pre, keep, final, block, kp in [
            (True, False, False, 4096, 256),
            (True, True, False, 4096, 32),
            (False, False, True, 512, 256),
            (True, False, True, 64, 1),
        ]:
            consts = dict(FROM_PRE=from_pre, HAS_KEEP=keep, FINAL=final, BLOCK=block, KP=kp)
            consts |= ({} if keep else {"keep_ptr": None}) | ({"cand_ptr": None} if final else {})
            src = f"*{dt}" if from_pre else "*i64"
            compile_one(topk, dt, consts, 8 if block >= 2048 else 4, src_ptr=src)
        width = 128 // (4 if dt == "fp32" else 2)
        blocks = dict(BLOCK_K=8, BLOCK_D=width)
        compile_one(triton_sparse._gather_combine_kernel, dt, dict(BLOCK_N=16, **blocks))
        compile_one(triton_sparse._gather_dot_kernel, dt, dict(BLOCK_N=512 // width, **blocks))
        for bias in (True, False):
            consts = dict(HAS_BIAS=bias, CHUNK=32, BLOCK_D=32)
            consts |= {} if bias else {"bias_ptr": None}
            compile_one(
                triton_sparse._segment_sum_kernel, dt, consts, out_ptr="*fp32", bias_ptr="*fp32"
            )


if __name__ == "__main__":
    main()
