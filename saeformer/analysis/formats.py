"""SAE files: export to and load from the SAELens layout, and load Qwen-Scope's `layer{n}.sae.pt`.

Both load into the `Bottleneck` module, so every metric runs the same code on every SAE.
Imported files are never unpickled into arbitrary objects: SAELens weights are safetensors,
and Qwen-Scope's torch files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saeformer.atomic import atomic_dir, write_json
from saeformer.errors import UserError
from saeformer.kernels import EncodeResult, topk
from saeformer.model import Bottleneck

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"  # the cfg.json layout written here (SAELens ≥ 6: a `metadata` table)
KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
QWEN_SCOPE_FILE = re.compile(r"^layer(\d+)\.sae\.pt$")
QWEN_SCOPE_K = re.compile(r"L0_(\d+)")


@dataclass
class SaeFile:
    """A loaded SAE and what its file says about where it applies."""

    sae: Bottleneck
    hook: str | None  # saeformer hook name, e.g. layers.12.output
    model_name: str | None
    source: str  # "saelens" or "qwen-scope"


class RawTopK(Bottleneck):
    """Qwen-Scope's TopK: top-k of W_enc·h + b_enc, without b_dec subtraction and without ReLU."""

    def encode(
        self, h: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0
    ) -> EncodeResult:
        """Raw top-k of the pre-activation (values may be negative); no AuxK."""
        if dead_mask is not None or k_aux:
            raise ValueError("Qwen-Scope SAEs are loaded for evaluation only (no AuxK)")
        values, indices = topk(torch.nn.functional.linear(h, self.W_enc, self.b_enc), k)
        return EncodeResult(values, indices, None, None)


def export_saelens(
    sae: Bottleneck,
    out: Path,
    *,
    hook: str,
    model_name: str,
    context_size: int,
    dataset_path: str,
) -> Path:
    """Write `out/cfg.json` and `out/sae_weights.safetensors` (W_enc [d_in, d_sae]) atomically."""
    tensors = {
        "W_enc": sae.W_enc.detach().T,
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_model,
        "d_sae": sae.width,
        "k": sae.k,
        "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": hook,
            "hook_layer": int(hook.split(".")[1]),
            "context_size": context_size,
            "prepend_bos": False,
            "exclude_special_tokens": True,
            "dataset_path": dataset_path,
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
        },
    }
    with atomic_dir(out) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, tmp / SAELENS_WEIGHTS)
        write_json(tmp / SAELENS_CFG, cfg)
    return out


def load_saelens(path: Path) -> SaeFile:
    """A TopK SAE saved in the SAELens layout (a folder with cfg.json and the safetensors)."""
    cfg = _read_json(path / SAELENS_CFG)
    where = f"SAELens SAE {path}"
    if cfg.get("architecture") != "topk":
        raise UserError(f"{where}: architecture {cfg.get('architecture')!r}; only 'topk' loads")
    if cfg.get("normalize_activations", "none") != "none" or cfg.get(
        "rescale_acts_by_decoder_norm", False
    ):
        raise UserError(f"{where}: activation normalisation or rescaling is not supported")
    if cfg.get("reshape_activations", "none") != "none":
        raise UserError(f"{where}: reshaped (hook_z) activations are not supported")
    try:
        d_in, d_sae, k = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
        tensors = load_file(path / SAELENS_WEIGHTS)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: cfg.json lacks a valid {exc}") from None
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise UserError(f"{where}: cannot read {SAELENS_WEIGHTS}: {exc}") from None
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    _check_tensors(tensors, shapes, where)
    sae = Bottleneck(d_in, d_sae, _check_k(k, d_sae, where))
    b_enc = tensors["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):  # fold W_enc·b_dec into the encoder bias
        b_enc = b_enc + tensors["b_dec"] @ tensors["W_enc"]
    _assign(sae, tensors["W_enc"].T, b_enc, tensors["W_dec"], tensors["b_dec"])
    meta = cfg.get("metadata") or cfg.get("meta") or cfg
    return SaeFile(sae, meta.get("hook_name"), meta.get("model_name"), "saelens")


def load_qwen_scope(path: Path, k: int | None = None) -> SaeFile:
    """A Qwen-Scope `layer{n}.sae.pt`: hook `layers.n.output`; k from the argument or `L0_<k>`."""
    where = f"Qwen-Scope SAE {path}"
    match = QWEN_SCOPE_FILE.match(path.name)
    if match is None:
        raise UserError(f"{where}: expected a file named layer<N>.sae.pt")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: not a torch dict of tensors ({reason})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: holds a {type(data).__name__}, expected a dict of tensors")
    W_enc = data.get("W_enc")
    if not isinstance(W_enc, Tensor) or W_enc.ndim != 2:
        raise UserError(f"{where}: W_enc is missing or not a matrix")
    d_sae, d_in = W_enc.shape
    shapes = {"W_enc": (d_sae, d_in), "b_enc": (d_sae,), "W_dec": (d_in, d_sae), "b_dec": (d_in,)}
    _check_tensors(data, shapes, where)
    if k is None:
        found = QWEN_SCOPE_K.findall(str(path.resolve()))
        if not found:
            raise UserError(f"{where}: pass k (the path has no L0_<k> part)")
        k = int(found[-1])
    sae = RawTopK(d_in, d_sae, _check_k(k, d_sae, where))
    _assign(sae, W_enc, data["b_enc"], data["W_dec"].T, data["b_dec"])
    hook = f"layers.{match.group(1)}.output"
    return SaeFile(sae, hook, None, "qwen-scope")


def load_sae(path: Path, k: int | None = None) -> SaeFile:
    """An SAELens folder or a Qwen-Scope `.sae.pt` file, told apart by what `path` is."""
    if path.is_dir():
        if not (path / SAELENS_CFG).is_file():
            raise UserError(f"{path}: a folder without {SAELENS_CFG} is not an SAELens SAE")
        return load_saelens(path)
    if path.name.endswith(".sae.pt"):
        return load_qwen_scope(path, k)
    raise UserError(f"{path}: not an SAE (an SAELens folder, or a Qwen-Scope layer<N>.sae.pt)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _check_tensors(tensors: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Exactly the four SAE tensors, floating point, with the expected shapes."""
    extra = sorted(str(k) for k in tensors if k not in shapes)
    if extra:
        raise UserError(f"{where}: unexpected entries {', '.join(extra)}")
    for key, shape in shapes.items():
        t = tensors.get(key)
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise UserError(f"{where}: {key} is missing or not a floating-point tensor")
        if tuple(t.shape) != shape:
            raise UserError(f"{where}: {key} has shape {tuple(t.shape)}, expected {shape}")


def _check_k(k: int, width: int, where: str) -> int:
    if not 0 < k <= width:
        raise UserError(f"{where}: k = {k} must be in 1..{width}")
    return k


@torch.no_grad()
def _assign(sae: Bottleneck, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor) -> None:
    """Copy weights in our layout (W_enc [F, d], W_dec [F, d]) into `sae`, in fp32."""
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    for param, value in zip(params, (W_enc, b_enc, W_dec, b_dec), strict=True):
        param.copy_(value.float())
