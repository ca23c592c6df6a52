"""SAE files: SAELens export/load round trip and Qwen-Scope loading, each checked against the
format's own encode/decode written out from the file's tensors; malformed files fail clearly."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saeformer.analysis.formats import export_saelens, load_qwen_scope, load_sae, load_saelens
from saeformer.errors import UserError
from saeformer.model import Bottleneck

D, F, K = 24, 96, 6


def random_sae(seed: int = 0) -> Bottleneck:
    torch.manual_seed(seed)
    sae = Bottleneck(D, F, K)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


def scatter(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(values), F).scatter(1, indices, values)


def saelens_reference(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """SAELens TopK: (x − b_dec) @ W_enc + b_enc, top-k, ReLU; decode acts @ W_dec + b_dec."""
    w = load_file(folder / "sae_weights.safetensors")
    cfg = json.loads((folder / "cfg.json").read_text())
    sae_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    top = (sae_in @ w["W_enc"] + w["b_enc"]).topk(cfg["k"], dim=-1)
    return scatter(top.values.relu(), top.indices) @ w["W_dec"] + w["b_dec"]


def qwen_scope_reference(w: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """The model cards' demo: x @ W_encᵀ + b_enc, raw top-k; decode with W_dec (d_model, d_sae)."""
    top = (x @ w["W_enc"].T + w["b_enc"]).topk(k, dim=-1)
    return scatter(top.values, top.indices) @ w["W_dec"].T + w["b_dec"]


def test_saelens_round_trip_matches_the_saelens_formula(tmp_path):
    sae = random_sae()
    out = export_saelens(
        sae,
        tmp_path / "sae",
        hook="layers.3.output",
        model_name="m",
        context_size=64,
        dataset_path="d",
    )
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    shapes = {k: tuple(v.shape) for k, v in load_file(out / "sae_weights.safetensors").items()}
    assert shapes == {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}
    loaded = load_sae(out)
    assert loaded.hook == "layers.3.output" and loaded.source == "saelens"
    torch.testing.assert_close(loaded.sae.state_dict(), sae.state_dict(), rtol=0, atol=0)
    x = torch.randn(50, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sae(x)[0], saelens_reference(out, x))
        torch.testing.assert_close(sae(x)[0], saelens_reference(out, x))


def test_saelens_without_b_dec_on_the_input_is_folded_into_the_encoder(tmp_path):
    out = export_saelens(
        random_sae(1),
        tmp_path / "sae",
        hook="layers.0.output",
        model_name="m",
        context_size=8,
        dataset_path="d",
    )
    cfg = json.loads((out / "cfg.json").read_text())
    (out / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    x = torch.randn(40, D)
    with torch.no_grad():
        torch.testing.assert_close(load_saelens(out).sae(x)[0], saelens_reference(out, x))


def qwen_scope_file(root: Path, name: str = "layer3.sae.pt") -> tuple[Path, dict]:
    torch.manual_seed(2)
    w = {
        "W_enc": 0.3 * torch.randn(F, D),
        "W_dec": torch.randn(D, F),
        "b_enc": 0.5 * torch.randn(F) - 3.0,  # some top-k values are negative: no ReLU hides them
        "b_dec": torch.randn(D),
    }
    path = root / "SAE-Res-Qwen3-1.7B-W96-L0_5" / name
    path.parent.mkdir()
    torch.save(w, path)
    return path, w


def test_qwen_scope_loads_with_its_own_encode(tmp_path):
    path, w = qwen_scope_file(tmp_path)
    loaded = load_sae(path)
    assert (loaded.hook, loaded.sae.k, loaded.source) == ("layers.3.output", 5, "qwen-scope")
    x = torch.randn(60, D)
    with torch.no_grad():
        got = loaded.sae(x)[0]
        code = loaded.sae.encode(x, 5)
    torch.testing.assert_close(got, qwen_scope_reference(w, x, 5))
    assert (code.values < 0).any()  # the case where SAELens's ReLU would differ
    torch.testing.assert_close(load_qwen_scope(path, k=2).sae(x)[0], qwen_scope_reference(w, x, 2))


class Payload:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/saeformer-pwned",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"W_enc": torch.zeros(F, D), "payload": Payload()}, "not a torch dict of tensors"),
        (b"garbage", "not a torch dict of tensors"),
        ([torch.zeros(3)], "holds a list"),
        (
            {"W_enc": torch.zeros(F, D), "b_enc": torch.zeros(F), "W_dec": torch.zeros(D, F)},
            "b_dec",
        ),
        (
            {
                "W_enc": torch.zeros(F, D),
                "b_enc": torch.zeros(F),
                "W_dec": torch.zeros(F, D),
                "b_dec": torch.zeros(D),
            },
            "W_dec has shape",
        ),
        (
            {
                "W_enc": torch.zeros(F, D),
                "b_enc": torch.zeros(F),
                "W_dec": torch.zeros(D, F),
                "b_dec": torch.zeros(D),
                "extra": torch.zeros(1),
            },
            "unexpected entries extra",
        ),
    ],
)
def test_malformed_qwen_scope_files_fail_without_unpickling_objects(tmp_path, content, message):
    path = tmp_path / "L0_5" / "layer0.sae.pt"
    path.parent.mkdir()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UserError, match=message):
        load_sae(path)
    assert not Path("/tmp/saeformer-pwned").exists()


def test_qwen_scope_needs_its_file_name_and_k(tmp_path):
    path, w = qwen_scope_file(tmp_path)
    renamed = tmp_path / "sae.pt"
    torch.save(w, renamed)
    with pytest.raises(UserError, match="layer<N>.sae.pt"):
        load_qwen_scope(renamed)
    no_k = tmp_path / "plain"
    no_k.mkdir()
    torch.save(w, no_k / "layer1.sae.pt")
    with pytest.raises(UserError, match="pass k"):
        load_sae(no_k / "layer1.sae.pt")
    with pytest.raises(UserError, match="k = 500"):
        load_qwen_scope(path, k=500)


def test_unknown_or_broken_saelens_folders_fail_clearly(tmp_path):
    out = export_saelens(
        random_sae(),
        tmp_path / "sae",
        hook="layers.0.output",
        model_name="m",
        context_size=8,
        dataset_path="d",
    )
    cfg = json.loads((out / "cfg.json").read_text())
    (out / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(UserError, match="only 'topk'"):
        load_sae(out)
    (out / "cfg.json").write_text(json.dumps({**cfg, "d_sae": F + 1}))
    with pytest.raises(UserError, match="W_enc has shape"):
        load_sae(out)
    (out / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_sae(out)
    (out / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": torch.zeros(2)}, out / "sae_weights.safetensors")
    with pytest.raises(UserError, match="unexpected|shape|missing"):
        load_sae(out)
    with pytest.raises(UserError, match="not an SAE"):
        load_sae(tmp_path / "nothing.bin")
