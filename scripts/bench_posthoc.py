"""Post-hoc TopK SAE training throughput and FVU: saeformer against EleutherAI's `sparsify`.

Both train the same SAE (width, k, batch, Adam settings, AuxK with k_aux = d/2 and α = 1/32,
unit-norm decoder rows with the parallel gradient removed, b_dec = mean activation) on the
same cached activations of a host model, on the same CPU threads, in alternating chunks of
steps so that load from other processes hits both alike. Reports activations/s (median over
chunks) and FVU on held-out activations after equal steps.

    python scripts/bench_posthoc.py --host runs/tiny-cpu-dense --data data/prepared/bundled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs CUDA

import torch  # noqa: E402

from saeformer.analysis.activations import (  # noqa: E402
    ActivationStream,
    StreamConfig,
    special_token_ids,
)
from saeformer.analysis.hooks import HookPoint, HostConfig, load_host  # noqa: E402
from saeformer.analysis.metrics import fvu  # noqa: E402
from saeformer.train.data import TokenData  # noqa: E402
from saeformer.train.posthoc import PosthocStrategy, SaeSet  # noqa: E402


def activations(args: argparse.Namespace) -> torch.Tensor:
    """`--tokens` activations at `--hook` of the host, filtered and shuffled as in training."""
    host = load_host(HostConfig(kind=args.host_kind, path=args.host))
    data = TokenData(args.data)
    hook = HookPoint.parse(args.hook)
    cfg = StreamConfig(dir=args.data, context=args.context, buffer_tokens=args.tokens)
    special = special_token_ids(data.tokenizer_path)
    stream = ActivationStream(host, [hook], data.split("train"), special, cfg, seed=0)
    return stream.buffer(0)[hook].float()


class Ours:
    """saeformer's post-hoc step: the Bottleneck module with AuxK and decoder upkeep."""

    name = "saeformer"

    def __init__(self, d: int, args: argparse.Namespace, first: torch.Tensor) -> None:
        self.saes = SaeSet(["sae"], [(d, args.width, args.k)])
        self.sae = self.saes.resid["0"]
        self.saes.init_from_data([first])
        self.opt = torch.optim.Adam(self.saes.parameters(), lr=args.lr, eps=6.25e-10)
        self.since = [torch.zeros(args.width, dtype=torch.long)]
        self.strategy = PosthocStrategy(k_aux=d // 2, dead_tokens=args.dead_tokens)

    def step(self, x: torch.Tensor) -> None:
        self.saes.train_step([x], self.opt, self.since, self.strategy, grad_clip=0.0)

    @torch.no_grad()
    def fvu(self, x: torch.Tensor) -> float:
        return fvu(x, self.sae(x)[0]).item()


class Sparsify:
    """The same step written with `sparsify.SparseCoder`, as its trainer does it."""

    name = "sparsify"

    def __init__(self, d: int, args: argparse.Namespace, first: torch.Tensor) -> None:
        from sparsify import SparseCoder, SparseCoderConfig

        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=args.width, k=args.k))
        with torch.no_grad():
            self.sae.b_dec.copy_(first.mean(0))  # as its trainer does with its first batch
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=args.lr, eps=6.25e-10)
        self.since = torch.zeros(args.width, dtype=torch.long)
        self.dead_tokens = args.dead_tokens

    def step(self, x: torch.Tensor) -> None:
        out = self.sae(x, dead_mask=self.since >= self.dead_tokens)
        (out.fvu + out.auxk_loss / 32).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sae.set_decoder_norm_to_unit_norm()
        self.since += len(x)
        self.since[out.latent_indices.flatten()] = 0

    @torch.no_grad()
    def fvu(self, x: torch.Tensor) -> float:
        return fvu(x, self.sae(x).sae_out).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="saeformer run dir or transformers model")
    parser.add_argument("--host-kind", choices=["saeformer", "hf"], default="saeformer")
    parser.add_argument("--data", type=Path, required=True, help="prepared tokens for the host")
    parser.add_argument("--hook", default="layers.2.output")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=262_144, help="cached activations")
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--chunk", type=int, default=10, help="steps per alternation")
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--dead-tokens", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    acts = activations(args)
    train, held_out = acts[: -args.eval_tokens], acts[-args.eval_tokens :]
    d = acts.shape[1]
    torch.manual_seed(0)
    first = train[: args.tokens // 4]  # what the trainer sees first (its first buffer)
    trainers = [Ours(d, args, first), Sparsify(d, args, first)]
    rates: dict[str, list[float]] = {t.name: [] for t in trainers}
    for start in range(0, args.steps, args.chunk):
        for t in trainers:
            begin = time.perf_counter()
            for s in range(start, min(start + args.chunk, args.steps)):
                lo = (s * args.batch) % (len(train) - args.batch + 1)
                t.step(train[lo : lo + args.batch])
            done = min(start + args.chunk, args.steps) - start
            rates[t.name].append(done * args.batch / (time.perf_counter() - begin))
    result = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "d_in": d,
        "torch": torch.__version__,
        "sparsify": version("eai-sparsify"),
        "threads": torch.get_num_threads(),
    }
    for t in trainers:
        result[t.name] = {
            "activations_per_s": statistics.median(rates[t.name]),
            "held_out_fvu": t.fvu(held_out),
        }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
