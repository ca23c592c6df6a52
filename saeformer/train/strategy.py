"""Per-step bottleneck upkeep (decoder-norm constraint, dead-feature counters) and KL
distillation from a dense teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from saeformer.analysis.metrics import dead_mask, next_token_kl
from saeformer.errors import UserError
from saeformer.model import Bottleneck, Transformer
from saeformer.runs import load_run
from saeformer.train.config import RunConfig
from saeformer.train.parallelize import compute_context


def resid_bottlenecks(model: Transformer) -> list[Bottleneck]:
    """The model's resid-site bottlenecks (the ones with unit-norm decoder rows)."""
    return list(model.resid.values())


@torch.no_grad()
def remove_parallel_decoder_grads(model: Transformer) -> None:
    """Drop the gradient component parallel to each (unit-norm) decoder row."""
    for b in resid_bottlenecks(model):
        if b.W_dec.grad is not None:
            parallel = (b.W_dec.grad * b.W_dec).sum(dim=1, keepdim=True)
            b.W_dec.grad.sub_(parallel * b.W_dec)


@torch.no_grad()
def normalize_decoders(model: Transformer) -> None:
    """Rescale every resid decoder row to unit norm after an optimizer step."""
    for b in resid_bottlenecks(model):
        b.normalize_decoder()


@torch.no_grad()
def track_decoder_bias(model: Transformer, means: dict[str, Tensor], rate: float) -> None:
    """Move each resid b_dec a fraction `rate` of the way to the batch mean of its input h.

    The residual stream's mean is large and drifts during training; a b_dec left behind it
    makes the latents that point against it negative on every token, hence dead for good."""
    for layer, b in model.resid.items():
        mean = means[f"resid.{layer}"].to(b.b_dec.dtype)
        if isinstance(b.b_dec, DTensor):  # FSDP2: the same full mean on every rank, sharded
            mean = distribute_tensor(mean, b.b_dec.device_mesh, b.b_dec.placements)
        b.b_dec.lerp_(mean, rate)


@torch.no_grad()
def raise_dead_biases(
    model: Transformer, since_fired: dict[str, Tensor], dead_tokens: int, rate: float
) -> None:
    """Raise each dead resid feature's b_enc by `rate`: a latent negative on every token gets no
    gradient through the ReLU, from AuxK or anything else, until its bias brings it back."""
    for layer, b in model.resid.items():
        dead = dead_mask(since_fired[f"resid.{layer}"], dead_tokens)
        step = dead.to(b.b_enc.dtype) * rate
        if isinstance(b.b_enc, DTensor):  # FSDP2: the same full mask on every rank, sharded
            step = distribute_tensor(step, b.b_enc.device_mesh, b.b_enc.placements)
        b.b_enc.add_(step)


def update_dead_counters(since_fired: Tensor, counts: Tensor, n_tokens: int) -> None:
    """Advance 'tokens since last fired' by n_tokens and reset the features that fired."""
    since_fired.add_(n_tokens)
    since_fired[counts.to(since_fired.device) > 0] = 0


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(teacher ‖ student) of the next-token distributions at temperature T, token mean."""
    t = temperature
    return t * t * next_token_kl(teacher_logits / t, student_logits / t).mean()


class Distiller:
    """A frozen teacher run whose next-token distributions the student is pulled towards."""

    def __init__(self, cfg: RunConfig, tokenizer: Path, device: torch.device) -> None:
        run_dir = cfg.strategy.teacher_run
        teacher = load_run(run_dir, device=str(device))
        same_vocab = teacher.config.model.vocab_size == cfg.model.vocab_size
        if not same_vocab or (run_dir / "tokenizer.json").read_bytes() != tokenizer.read_bytes():
            raise UserError(f"strategy.teacher_run {run_dir} has another tokenizer than the data")
        self.model = teacher.model.requires_grad_(False)
        self.cfg, self.device = cfg, device

    def loss(self, tokens: Tensor, student_logits: Tensor) -> Tensor:
        """The distillation loss on the student's batch (teacher forward without gradients)."""
        with torch.no_grad(), compute_context(self.cfg.train, self.device):
            teacher_logits = self.model(tokens.to(self.device)).logits
        return distill_loss(student_logits, teacher_logits, self.cfg.strategy.temperature)
