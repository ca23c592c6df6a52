"""Benchmark the bottleneck kernels: per-op Triton grid (CUDA), or the whole layer (any device).

`--mode ops` (default on CUDA and under TRITON_INTERPRET=1): one row per (op, pass, N, F, k,
dtype, impl): median time, its ratio to the torch twin timed in the same process, achieved
bandwidth for the op's compulsory traffic, and that bandwidth as a share of the roofline (a
measured device-to-device copy, or --peak-gbps). Checks that Triton agrees with the torch twin
on every output and gradient of each case before timing it.

`--mode layer` (default on CPU): `saeformer.model.Bottleneck` forward + backward (the dispatched
kernels) against a naive dense layer (dense top-k mask, dense matmuls, autograd) and one dense
N·d·F matmul, timed interleaved in one process (medians), plus each layer's peak memory above
its inputs and weights (CPU: peak RSS, reset through /proc/self/clear_refs; CUDA: the allocator).

    python scripts/bench_kernels.py                      # CPU: the layer at d=512, F=8192, 32768
    python scripts/bench_kernels.py --device cuda        # CUDA: the default op grid, fp32 and bf16
    python scripts/bench_kernels.py --device cuda --d 2048 --F 65536 --k 64 --N 16384 --dtype bf16
    python scripts/bench_kernels.py --device cuda --mode layer --d 2048 --F 65536 --k 64 \\
        --N 16384 --dtype bf16
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --device cpu --F 64 --k 4 --N 8 --d 16

Results go to stdout and to this script's section of docs/benchmarks.md (`--doc`, `--no-doc`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor
from tqdm import tqdm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OP_FN = {"topk": "topk", "decode": "sparse_decode", "encode": "encode_topk"}
OPS = tuple(OP_FN)
DEFAULTS = {
    "ops": {
        "F": [32768, 65536, 131072],
        "k": [32, 64, 128],
        "N": [4096, 16384],
        "d": 768,
        "dtype": ["fp32", "bf16"],
        "warmup": 3,
        "repeats": 10,
    },
    "layer": {
        "F": [8192, 32768],
        "k": [32],
        "N": [2048, 4096],
        "d": 512,
        "dtype": ["fp32"],
        "warmup": 1,
        "repeats": 7,
    },
}
"""Grid defaults per mode (issue 3: the CPU layer at d = 512, F = 8192 and 32768, k = 32)."""
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
LAYER_TARGETS = {"cpu": (32768, 6.0, 2.0), "cuda": (65536, None, 1.5)}
"""Issue 3 targets per device: (at width F, min speed-up over naive dense, max matmuls)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; grid defaults depend on the mode."""
    p = _Parser(prog="bench_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mode",
        choices=["auto", "ops", "layer"],
        default="auto",
        help="ops: per-kernel grid; layer: whole bottleneck vs naive dense "
        "(auto: ops on CUDA or under TRITON_INTERPRET, else layer)",
    )
    p.add_argument(
        "--F", type=int, nargs="+", help="widths (ops: 32768 65536 131072; layer: 8192 32768)"
    )
    p.add_argument("--k", type=int, nargs="+", help="active latents (ops: 32 64 128; layer: 32)")
    p.add_argument(
        "--N", type=int, nargs="+", help="tokens per batch (ops: 4096 16384; layer: 2048 4096)"
    )
    p.add_argument("--d", type=int, help="model width (ops: 768; layer: 512)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, help="ops: fp32 bf16; layer: fp32")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops mode: which")
    p.add_argument("--no-dense", action="store_true", help="skip the naive dense baseline")
    p.add_argument("--warmup", type=int, help="untimed calls per impl (ops: 3; layer: 1)")
    p.add_argument("--repeats", type=int, help="timed calls per impl (ops: 10; layer: 7)")
    p.add_argument("--peak-gbps", type=float, help="roofline bandwidth (default: measured copy)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--doc", type=Path, default=DOC, help="markdown file to record results in")
    p.add_argument("--no-doc", action="store_true", help="print only; leave --doc untouched")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.mode == "auto":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        args.mode = "ops" if args.device.startswith("cuda") or interpret else "layer"
    for key, value in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = [*args.F, *args.k, *args.N, args.d, args.repeats]
    if min(sizes) < 1 or args.warmup < 0 or args.threads < 0:
        p.error("--F, --k, --N, --d and --repeats must be positive; --warmup, --threads >= 0")
    if max(args.k) > min(args.F):
        p.error(f"every --k must be at most every --F (k = {max(args.k)} > F = {min(args.F)})")
    if args.mode == "layer" and args.no_dense:
        p.error("--no-dense applies to --mode ops only (the layer mode is a comparison)")
    return args


class Report:
    """Prints lines above the progress bar and keeps them for the markdown record."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        tqdm.write(line)
        self.lines.append(line)


def machine(device: torch.device) -> str:
    """The hardware and software that produced the numbers, in one line."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in info.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = f"{cpu}, {cores} cores, torch threads: {torch.get_num_threads()}"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    return f"{gpu}; {host}; torch {torch.__version__}, {platform.system()} {platform.machine()}"


def load_average() -> str:
    """The 1-minute load average (other processes share the machine), or n/a."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def write_section(doc: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` (or append it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")


def record(
    doc: Path | None,
    script: str,
    argv: list[str] | None,
    section: str,
    title: str,
    header: list[str],
    lines: list[str],
) -> None:
    """Write a run's header lines, command and table to its section of `doc` (None: skip)."""
    if doc is None:
        return
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", f"scripts/{script}", *argv])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"### {title}",
        "",
        *[f"- {h}" for h in header],
        f"- date: {date}",
        f"- command: `PYTHONPATH=. {command}`",
        "",
        "```text",
        *lines,
        "```",
    ]
    write_section(doc, section, "\n".join(body))
    print(f"recorded in {doc} (section {section})")


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


def bench_case(
    args, impls: dict[str, Any], op: str, n, f, k, dtype_name, peak, say: Callable[[str], None]
) -> None:
    """Check Triton against the torch twin, then time every impl, forward and forward+backward."""
    device = torch.device(args.device)
    run, (fwd_bytes, bwd_bytes) = make_case(op, n, f, k, args.d, DTYPES[dtype_name], device)
    diff = max_rel_diff(run(impls["triton"], True), run(impls["torch"], True))
    say(f"# {op} N={n} F={f} k={k} {dtype_name}: triton vs torch max rel diff {diff:.2e}")
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
                say(f"{label} {name:6} out of memory")
                torch.cuda.empty_cache()
                continue
            base = ms if name == "torch" else base
            gbps = nbytes / ms / 1e6
            ratio = f"{ms / base:6.2f}x" if base else "   n/a "
            say(
                f"{label} {name:6} {n:6} {f:7} {k:4} "
                f"{dtype_name:5} {ms:9.3f} ms {ratio} {gbps:8.1f} GB/s {100 * gbps / peak:5.1f}%"
            )


# ---------------------------------------------------------------- the whole layer


def naive_layer(bn: Any, h: Tensor, k: int) -> Tensor:
    """The dense reference of Bottleneck at α = 1: a dense top-k mask on the N×F
    pre-activation, a dense code and dense matmuls, differentiated by autograd."""
    pre = nnf.linear(h - bn.b_dec, bn.W_enc, bn.b_enc)
    top = pre.detach().topk(k, dim=1).indices
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, top, True)
    return (pre.relu() * mask) @ bn.W_dec + bn.b_dec


class LayerCase:
    """One bottleneck layer with its input and upstream grad; runs either implementation."""

    def __init__(self, n: int, f: int, k: int, d: int, dtype: torch.dtype, device) -> None:
        from saeformer.model import Bottleneck

        torch.manual_seed(0)
        self.k = k
        self.bn = Bottleneck(d, f, k).to(device, dtype)
        self.h = torch.randn(n, d, device=device, dtype=dtype).requires_grad_()
        self.grad = torch.randn(n, d, device=device, dtype=dtype)

    def clear(self) -> None:
        """Drop the gradients of the previous run."""
        self.bn.zero_grad(set_to_none=True)
        self.h.grad = None

    def run(self, impl: str) -> list[Tensor]:
        """Forward + backward of `impl` ("torch": the dispatched kernels, or "dense")."""
        self.clear()
        out = self.bn(self.h)[0] if impl == "torch" else naive_layer(self.bn, self.h, self.k)
        out.backward(self.grad)
        return [out, self.h.grad, *(p.grad for p in self.bn.parameters())]

    @torch.no_grad()
    def matmul(self) -> Tensor:
        """One dense N·d·F matmul, the unit of the layer's cost."""
        return self.h @ self.bn.W_enc.T


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one synchronised call, in milliseconds."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def interleaved_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, args, bar: tqdm
) -> dict[str, float]:
    """Median time of each fn, calling them in turn (order rotated every round) so that
    background load hits all alike."""
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed_ms(fns[name], device))
        bar.update(1)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def exact_rss() -> None:
    """Make freed tensors leave the RSS: fix glibc's mmap threshold at 64 KiB (no dynamic
    threshold that would keep freed blocks of up to 32 MiB in the heap)."""
    ctypes.CDLL(None).mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD


def peak_mib(case: LayerCase, impl: str, device: torch.device) -> float:
    """Peak memory of one forward + backward above what was allocated before it, in MiB."""
    case.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        case.run(impl)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    case.run(impl)
    return (_status_kib("VmHWM") - base) / 1024


def bench_layer(args: argparse.Namespace, device: torch.device, say: Report) -> list[str]:
    """Time and measure every (dtype, N, F, k) case of the layer; return summary lines."""
    cases = [(dt, n, f, k) for dt in args.dtype for f in args.F for k in args.k for n in args.N]
    say(
        f"# d={args.d}; median of {args.repeats} interleaved calls; ratios within one case; "
        "memory: peak above inputs and weights; max rel diff: outputs and grads, torch vs dense"
    )
    say(
        "#     N      F   k dtype  torch ms  dense ms matmul ms  dense/torch  torch/mm  "
        "dense/mm  torch MiB  dense MiB  N×F MiB  max rel diff"
    )
    peaks: dict[tuple, dict[str, float]] = {}
    summary = []
    with tqdm(total=len(cases) * args.repeats, desc="layer", unit="round") as bar:
        for dt, n, f, k in cases:
            case = LayerCase(n, f, k, args.d, DTYPES[dt], device)
            diff = max_rel_diff(case.run("torch"), case.run("dense"))
            ms = interleaved_ms(
                {
                    "torch": lambda c=case: c.run("torch"),
                    "dense": lambda c=case: c.run("dense"),
                    "mm": case.matmul,
                },
                device,
                args,
                bar,
            )
            if device.type == "cpu":
                exact_rss()
            peak = peaks[(dt, f, k, n)] = {i: peak_mib(case, i, device) for i in ("torch", "dense")}
            pre_mib = n * f * torch.tensor([], dtype=DTYPES[dt]).element_size() / 2**20
            say(
                f"{n:7} {f:6} {k:3} {dt:5} {ms['torch']:9.1f} {ms['dense']:9.1f} {ms['mm']:9.1f} "
                f"{ms['dense'] / ms['torch']:11.2f}x {ms['torch'] / ms['mm']:8.2f} "
                f"{ms['dense'] / ms['mm']:9.2f} {peak['torch']:10.0f} {peak['dense']:10.0f} "
                f"{pre_mib:8.0f}  {diff:.1e}"
            )
            summary.append(layer_verdict(device, n, f, ms))
            del case
    summary = [line for line in summary + memory_growth(peaks, args) if line]
    for line in summary:
        tqdm.write(line)
    return summary


def layer_verdict(device: torch.device, n: int, f: int, ms: dict[str, float]) -> str:
    """Issue 3's targets for a case at the width they are set for ("" for other widths)."""
    width, speedup_min, matmuls_max = LAYER_TARGETS.get(device.type, (0, None, None))
    if f != width:
        return ""
    speedup, matmuls = ms["dense"] / ms["torch"], ms["torch"] / ms["mm"]
    parts = [
        f"{matmuls:.2f} dense matmuls (target <= {matmuls_max:g}: {_met(matmuls <= matmuls_max)})"
    ]
    if speedup_min is not None:
        parts.insert(
            0,
            f"{speedup:.2f}x faster than naive dense (target >= {speedup_min:g}x: "
            f"{_met(speedup >= speedup_min)})",
        )
    return f"N={n} F={f}: " + "; ".join(parts)


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def memory_growth(peaks: dict[tuple, dict[str, float]], args: argparse.Namespace) -> list[str]:
    """Peak memory per extra token between the smallest and largest N, against F·4 bytes."""
    if len(set(args.N)) < 2:
        return []
    lo, hi = min(args.N), max(args.N)
    lines = []
    for dt, f, k, _ in sorted({key for key in peaks if key[3] == hi}):
        a, b = peaks[(dt, f, k, lo)], peaks[(dt, f, k, hi)]
        per_token = {i: (b[i] - a[i]) * 1024 / (hi - lo) for i in a}
        row = f * torch.tensor([], dtype=DTYPES[dt]).element_size() / 1024
        lines.append(
            f"memory growth N {lo}->{hi}, F={f} k={k} {dt}: torch {per_token['torch']:.1f} "
            f"KiB/token, dense {per_token['dense']:.1f} KiB/token (one pre-activation row: "
            f"{row:.0f} KiB)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmark, print its table and record it in the doc."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    say = Report()
    header = [f"machine: {machine(device)}", f"load average (1 min) at start: {load_average()}"]
    if args.mode == "layer":
        title = f"Bottleneck layer, forward + backward ({device.type})"
        summary = bench_layer(args, device, say)
    else:
        title = f"Kernels ({device.type})"
        if bench_ops(args, device, say):
            return 1
        summary = []
    header.append(f"load average (1 min) at end: {load_average()}")
    header += summary
    threads = f"-{args.threads}t" if args.threads else ""
    section = f"bench_kernels-{device.type}-{args.mode}{threads}"
    record(
        None if args.no_doc else args.doc,
        "bench_kernels.py",
        argv,
        section,
        title,
        header,
        say.lines,
    )
    return 0


def bench_ops(args: argparse.Namespace, device: torch.device, say: Report) -> int:
    """The per-kernel grid: Triton against the torch twin and the naive dense baseline."""
    from saeformer.kernels import torch_ops

    try:
        from saeformer.kernels import triton_ops
    except ImportError as err:
        print(f"bench_kernels: Triton kernels unavailable: {err}", file=sys.stderr)
        return 1
    impls = {"torch": torch_ops, "triton": triton_ops}  # torch first: the ratio's baseline
    if not args.no_dense:
        impls["dense"] = DENSE
    peak = args.peak_gbps or copy_gbps(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say(f"# device {name}; roofline {peak:.0f} GB/s; d={args.d}; time ratios vs torch twin")
    say("# op     pass    impl        N       F    k dtype      time     ratio  bandwidth  roof")
    for op in args.ops:
        for dtype_name in args.dtype:
            for n in args.N:
                for f in args.F:
                    for k in args.k:
                        bench_case(args, impls, op, n, f, k, dtype_name, peak, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
