"""The TopK bottleneck of DESIGN.md: the one place its formula is written."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saeformer.analysis.metrics import firing_counts, fvu, l0
from saeformer.kernels import EncodeResult, encode_topk, sparse_decode, topk


@dataclass
class AuxRequest:
    """Auxiliary losses the trainer asks of one bottleneck at one step."""

    rec: bool = False  # reconstruction FVU (trains the bottleneck only)
    dead_mask: Tensor | None = None  # [F] bool, for AuxK
    k_aux: int = 0


@dataclass
class SiteOutput:
    """What a bottleneck hands back besides its output: stats, losses and the code."""

    l0: Tensor
    counts: Tensor  # [F] tokens each feature fired on
    fvu: Tensor | None = None  # resid sites: FVU of ĥ against h (no grad)
    mean_h: Tensor | None = None  # resid sites: mean of h over the batch [d] (no grad)
    rec_loss: Tensor | None = None
    auxk_loss: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None


class Bottleneck(nn.Module):
    """SAE-like TopK layer: out = α·ĥ + (1−α)·h.

    ĥ = W_decᵀ TopK(ReLU(W_enc(h − b_dec) + b_enc)) + b_dec, with unit-norm decoder rows.
    """

    def __init__(
        self, d_model: int, width: int, k: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.d_model, self.width, self.k = d_model, width, k
        self.W_enc = nn.Parameter(torch.empty(width, d_model))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.empty(width, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows; encoder initialised as the decoder transpose."""
        self.W_dec.normal_(generator=generator)
        self.normalize_decoder()
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def encode(
        self, h: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0
    ) -> EncodeResult:
        """Sparse code of rows h [N, d]: TopK of ReLU(W_enc (h − b_dec) + b_enc)."""
        return encode_topk(h - self.b_dec, self.W_enc, self.b_enc, k, dead_mask, k_aux)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """ĥ = W_decᵀ z + b_dec for a sparse code given as (values, indices)."""
        return sparse_decode(values, indices, self.W_dec) + self.b_dec

    def forward(
        self,
        h: Tensor,
        *,
        alpha: float = 1.0,
        k: int | None = None,
        aux: AuxRequest | None = None,
        keep_code: bool = False,
    ) -> tuple[Tensor, SiteOutput]:
        """Return α·ĥ + (1−α)·h for h [..., d] and the site's stats and auxiliary losses."""
        k = self.k if k is None else k
        rows = h.reshape(-1, self.d_model)
        # A frozen input (post-hoc SAEs) needs no second, detached pass: one encode serves all.
        one_pass = aux is not None and not rows.requires_grad
        dead_mask, k_aux = (aux.dead_mask, aux.k_aux) if one_pass else (None, 0)
        code = self.encode(rows, k, dead_mask, k_aux)
        h_hat = self.decode(code.values, code.indices)
        out = h_hat if alpha == 1.0 else alpha * h_hat + (1.0 - alpha) * rows
        with torch.no_grad():
            site = SiteOutput(
                l0=l0(code.values),
                counts=firing_counts(code.values, code.indices, self.width),
                fvu=fvu(rows, h_hat),
                mean_h=rows.float().mean(0),
            )
        if keep_code:
            site.values, site.indices = code.values, code.indices
        if one_pass:
            self._auxiliary_losses(rows, h_hat, code, aux, site)
        elif aux is not None:
            detached = rows.detach()
            second = self.encode(detached, k, aux.dead_mask, aux.k_aux)
            h_hat = self.decode(second.values, second.indices)
            self._auxiliary_losses(detached, h_hat, second, aux, site)
        return out.reshape(h.shape), site

    def _auxiliary_losses(
        self, rows: Tensor, h_hat: Tensor, code: EncodeResult, aux: AuxRequest, site: SiteOutput
    ) -> None:
        """Reconstruction FVU and AuxK of an encode pass on rows that cannot move the host."""
        if aux.rec:
            site.rec_loss = fvu(rows, h_hat, detach_denominator=True)
        if aux.k_aux > 0 and code.aux_values is not None:
            error = (rows - h_hat).detach()
            error_hat = sparse_decode(code.aux_values, code.aux_indices, self.W_dec)
            any_dead = aux.dead_mask.any()  # no dead feature: AuxK is 0 (a mask, not a sync)
            site.auxk_loss = fvu(error, error_hat, detach_denominator=True) * any_dead


class TopKMLP(nn.Module):
    """An `mlp` site: MLP(x) = W_down · TopK_k(GELU(W_up x)); hidden units are the features."""

    def __init__(self, d_model: int, width: int, k: int, n_layers: int) -> None:
        super().__init__()
        self.d_model, self.width, self.k = d_model, width, k
        self.up = nn.Linear(d_model, width)
        self.W_dec = nn.Parameter(torch.empty(width, d_model))  # rows = columns of W_down
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        nn.init.normal_(self.W_dec, std=0.02 / math.sqrt(2 * n_layers))

    def forward(
        self, x: Tensor, *, k: int | None = None, keep_code: bool = False
    ) -> tuple[Tensor, SiteOutput]:
        """Return the MLP output for x [..., d] and the site's stats."""
        k = self.k if k is None else k
        hidden = F.gelu(self.up(x.reshape(-1, self.d_model)))
        values, indices = topk(hidden, k)
        out = sparse_decode(values, indices, self.W_dec) + self.b_dec
        with torch.no_grad():
            site = SiteOutput(l0=l0(values), counts=firing_counts(values, indices, self.width))
        if keep_code:
            site.values, site.indices = values, indices
        return out.reshape(x.shape), site
