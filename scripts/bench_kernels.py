"""Benchmark the Triton kernels against the torch twins and a naive dense baseline.

One row per (op, pass, N, F, k, dtype, impl): median time, its ratio to the torch twin timed in
the same process, achieved bandwidth for the op's compulsory traffic, and that bandwidth as a
share of the roofline (a measured device-to-device copy, or --peak-gbps). Checks that Triton
agrees with the torch twin on every output and gradient of each case before timing it.

    python scripts/bench_kernels.py                      # the default grid, fp32 and bf16
    python scripts/bench_kernels.py --F 65536 --k 64 --N 8192 --dtype bf16 --ops decode
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --device cpu --F 64 --k 4 --N 8 --d 16
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OP_FN = {"topk": "topk", "decode": "sparse_decode", "encode": "encode_topk"}
OPS = tuple(OP_FN)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--F", type=int, nargs="+", default=[32768, 65536, 131072], help="widths")
    p.add_argument("--k", type=int, nargs="+", default=[32, 64, 128], help="active latents")
    p.add_argument("--N", type=int, nargs="+", default=[4096, 16384], help="tokens per batch")
    p.add_argument("--d", type=int, default=768, help="model width (default 768)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--no-dense", action="store_true", help="skip the naive dense baseline")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-gbps", type=float, help="roofline bandwidth (default: measured copy)")
    p.add_argument("--device", default="cuda", help="default cuda; cpu needs TRITON_INTERPRET=1")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    """Wait for queued kernels on `device`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_gbps(device: torch.device) -> float:
    """Achieved bandwidth (read + write) of a 1 GiB device-to-device copy, in GB/s."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, 2, 5)
    return 2 * src.nbytes / ms / 1e6


# ---------------------------------------------------------------- naive dense baselines


def dense_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Scatter into a dense code [N, F] and multiply: backward is dense too."""
    z = values.new_zeros(values.shape[0], W_dec.shape[0]).scatter(1, indices, values)
    return z @ W_dec


def dense_encode(h: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Dense pre, top-k, dense ReLU'd code; values gathered back so backward stays dense."""
    pre = nnf.linear(h, W_enc, b_enc)
    indices = pre.detach().topk(k, dim=-1).indices
    z = torch.zeros_like(pre).scatter(1, indices, pre.gather(1, indices).relu())
    return z.gather(1, indices), indices


DENSE = SimpleNamespace(sparse_decode=dense_decode, encode_topk=dense_encode)
"""The naive dense baseline (topk has none: its torch twin is torch.topk)."""


# ---------------------------------------------------------------- cases


def make_case(op: str, n: int, f: int, k: int, d: int, dtype: torch.dtype, device):
    """A run(impl, backward) -> [outputs, grads] closure and compulsory bytes (fwd, bwd).

    Compulsory traffic: every input and output read or written once, a gathered row once per
    use; sorting and zero-filling are not counted. Encode's dense matmul is compute-bound, so
    its roofline share understates how close it is to its floor.
    """
    e = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    if op == "topk":
        pre, grad = rand(n, f).requires_grad_(), rand(n, k)

        def run(impl: Any, backward: bool) -> list[Tensor]:
            pre.grad = None
            values, _ = impl.topk(pre, k)
            if backward:
                values.backward(grad)
            return [values, pre.grad] if backward else [values]

        return run, (n * f * e + n * k * (e + 8), n * f * e + n * k * (e + 8))
    if op == "decode":
        values, W = rand(n, k).requires_grad_(), (rand(f, d) / d**0.5).requires_grad_()
        indices = torch.randint(0, f, (n, k), generator=gen, device=device)
        grad = rand(n, d)

        def run(impl: Any, backward: bool) -> list[Tensor]:
            values.grad = W.grad = None
            out = impl.sparse_decode(values, indices, W)
            if backward:
                out.backward(grad)
            return [out, values.grad, W.grad] if backward else [out]

        codes, gathered = n * k * (e + 8), n * k * d * e
        return run, (codes + gathered + n * d * e, codes + n * d * e + 2 * gathered + f * d * e)
    h, W = rand(n, d).requires_grad_(), (rand(f, d) / d**0.5).requires_grad_()
    b, grad = rand(f).requires_grad_(), rand(n, k)

    def run(impl: Any, backward: bool) -> list[Tensor]:
        h.grad = W.grad = b.grad = None
        values = impl.encode_topk(h, W, b, k)[0]
        if backward:
            values.backward(grad)
        return [values, h.grad, W.grad, b.grad] if backward else [values]

    codes, gathered = n * k * (e + 8), n * k * d * e
    fwd = n * d * e + f * d * e + 2 * n * f * e + codes
    return run, (fwd, codes + 2 * gathered + 2 * n * d * e + f * (d + 1) * e)


def max_rel_diff(got: list[Tensor], want: list[Tensor]) -> float:
    """Largest |got - want| over all tensors, relative to each reference's largest magnitude."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        scale = b.float().abs().max().clamp_min(1e-30)
        worst = max(worst, ((a.float() - b.float()).abs().max() / scale).item())
    return worst


def bench_case(args, impls: dict[str, Any], op: str, n, f, k, dtype_name, peak) -> None:
    """Check Triton against the torch twin, then time every impl, forward and forward+backward."""
    device = torch.device(args.device)
    run, (fwd_bytes, bwd_bytes) = make_case(op, n, f, k, args.d, DTYPES[dtype_name], device)
    diff = max_rel_diff(run(impls["triton"], True), run(impls["torch"], True))
    print(f"# {op} N={n} F={f} k={k} {dtype_name}: triton vs torch max rel diff {diff:.2e}")
    for backward, nbytes in ((False, fwd_bytes), (True, fwd_bytes + bwd_bytes)):
        base = None
        label = f"{op:6} {'fwd+bwd' if backward else 'fwd':7}"
        for name, impl in impls.items():
            if not hasattr(impl, OP_FN[op]):
                continue
            try:
                ms = median_ms(
                    lambda i=impl, b=backward: run(i, b), device, args.warmup, args.repeats
                )
            except torch.cuda.OutOfMemoryError:
                print(f"{label} {name:6} out of memory")
                torch.cuda.empty_cache()
                continue
            base = ms if name == "torch" else base
            gbps = nbytes / ms / 1e6
            ratio = f"{ms / base:6.2f}x" if base else "   n/a "
            print(
                f"{label} {name:6} {n:6} {f:7} {k:4} "
                f"{dtype_name:5} {ms:9.3f} ms {ratio} {gbps:8.1f} GB/s {100 * gbps / peak:5.1f}%"
            )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark grid and print the table."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 1
    from saeformer.kernels import torch_ops

    try:
        from saeformer.kernels import triton_ops
    except ImportError as err:
        print(f"bench_kernels: Triton kernels unavailable: {err}", file=sys.stderr)
        return 1
    impls = {"torch": torch_ops, "triton": triton_ops}  # torch first: the ratio's baseline
    if not args.no_dense:
        impls["dense"] = DENSE
    device = torch.device(args.device)
    peak = args.peak_gbps or copy_gbps(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# device {name}; roofline {peak:.0f} GB/s; d={args.d}; time ratios vs torch twin")
    print("# op     pass    impl        N       F    k dtype      time     ratio  bandwidth  roof")
    for op in args.ops:
        for dtype_name in args.dtype:
            for n in args.N:
                for f in args.F:
                    for k in args.k:
                        bench_case(args, impls, op, n, f, k, dtype_name, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
