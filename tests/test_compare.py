"""The comparison: CE-loss score and KL on hand-checkable cases, and `saeformer compare` on a
joint bottleneck, a post-hoc SAE and a random-weights control."""

import json
import math
from pathlib import Path

import pytest
import torch
from posthoc_models import dense_run, tiny_hf
from tokenizers import Tokenizer

from saeformer.analysis.compare import ProbeConfig, measure
from saeformer.analysis.formats import export_saelens
from saeformer.analysis.hooks import HFHost, HookPoint
from saeformer.analysis.metrics import ce_loss_score, next_token_kl
from saeformer.analysis.probing import brown_probe_set, k_sparse_probe
from saeformer.cli import main
from saeformer.model import Bottleneck
from saeformer.train.data import TokenData, fixed_windows


def test_ce_loss_score_and_kl_by_hand():
    assert ce_loss_score(ce_clean=2.0, ce_spliced=2.5, ce_zero=4.0) == pytest.approx(0.75)
    assert ce_loss_score(2.0, 2.0, 4.0) == 1.0 and ce_loss_score(2.0, 4.0, 4.0) == 0.0
    clean = torch.tensor([0.0, 0.0])  # p = (1/2, 1/2)
    spliced = torch.tensor([math.log(3.0), 0.0])  # q = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert next_token_kl(clean, spliced).item() == pytest.approx(expected)


def exact_sae(d: int) -> Bottleneck:
    """Reconstructs any h exactly: features ±e_i with k = 2d (ReLU keeps the right sign)."""
    sae = Bottleneck(d, 2 * d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_splicing_an_exact_and_a_null_sae(data_dir):
    pytest.importorskip("transformers")
    host = HFHost(tiny_hf("qwen3", vocab_size=512), "q")
    hook = HookPoint(1, "output")
    probe = ProbeConfig(windows=4, context=16, batch=2)
    data = TokenData(data_dir)
    windows = fixed_windows(data.split("val"), 16, 4)
    special = [data.meta["eos_id"]]
    exact, _ = measure(host, hook, exact_sae(32), True, windows, special, probe)
    assert exact["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert exact["ce_spliced"] == pytest.approx(exact["ce_clean"], abs=1e-5)
    assert exact["ce_score"] == pytest.approx(1.0, abs=1e-3)
    assert exact["kl"] == pytest.approx(0.0, abs=1e-6)
    null = Bottleneck(32, 8, 2)
    with torch.no_grad():
        null.W_dec.zero_()
    zero, _ = measure(host, hook, null, True, windows, special, probe)
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero"], abs=1e-5)
    assert zero["ce_score"] == pytest.approx(0.0, abs=1e-4)


COMPARE = """
[probe]
windows = 4
context = 32
batch = 4
top_m = 4
brown = "{brown}"
brown_windows = 8
brown_words_per_doc = 60
probe_k = [1, 4]

[[entry]]
name = "joint"
host = {{ kind = "saeformer", path = "{joint}" }}
data = "{data}"
bottleneck = "resid.0"
seed_twin = "{joint}"

[[entry]]
name = "post-hoc"
host = {{ kind = "saeformer", path = "{dense}" }}
data = "{data}"
sae = "{sae}"

[[entry]]
name = "random control"
host = {{ kind = "saeformer", path = "{dense}", random_init = true }}
data = "{data}"
sae = "{sae}"
"""


def test_compare_prints_one_table_for_all_entries(tmp_path, data_dir, capsys):
    joint = dense_run(tmp_path, data_dir, joint=True)
    dense = dense_run(tmp_path, data_dir)
    torch.manual_seed(0)
    sae = export_saelens(
        Bottleneck(32, 64, 4),
        tmp_path / "sae",
        hook="layers.0.output",
        model_name="dense",
        context_size=32,
        dataset_path=str(data_dir),
    )
    config = tmp_path / "compare.toml"
    brown = "data/brown-tagged.tsv.xz"
    config.write_text(COMPARE.format(brown=brown, joint=joint, dense=dense, data=data_dir, sae=sae))
    assert main(["compare", str(config), "--json", str(tmp_path / "out.json")]) == 0
    table = capsys.readouterr().out
    assert "| joint | layers.0.output | 64 | 4 |" in table
    assert "| random control |" in table
    rows = {r["name"]: r for r in json.loads((tmp_path / "out.json").read_text())}
    assert rows["joint"]["stable_frac"] == 1.0  # a run matched with itself
    assert rows["joint"]["match_cosine_median"] == pytest.approx(1.0)
    assert "stable_frac" not in rows["post-hoc"]
    assert "ce_score" not in rows["joint"] and rows["joint"]["ce"] > 0
    assert math.isfinite(rows["post-hoc"]["ce_score"])
    assert rows["post-hoc"]["ce_clean"] != rows["random control"]["ce_clean"]
    for row in rows.values():
        assert row["l0"] <= row["k"] and 0 <= row["dead_frac"] <= 1
        assert 0 <= row["pos:noun@k=4"] <= 1
        assert "control:random token label@k=1" in row


def test_k_sparse_probe_finds_the_informative_feature():
    gen = torch.Generator().manual_seed(0)
    n, width = 2000, 50
    labels = (torch.rand(n, generator=gen) < 0.3).long()
    indices = torch.stack([torch.randint(1, width, (n,), generator=gen), torch.zeros(n).long()], 1)
    values = torch.stack([torch.rand(n, generator=gen), labels.float() * 2.0], 1)
    train = torch.arange(n) % 2 == 0
    scores = k_sparse_probe(values, indices, width, labels, train, [1, 4])
    assert scores[1] == 1.0 and scores[4] == 1.0  # feature 0 fires exactly on the positives
    noise = k_sparse_probe(values[:, :1], indices[:, :1], width, labels, train, [1])
    assert abs(noise[1] - 0.5) < 0.1  # balanced classes: chance is one half


def test_brown_labels_follow_the_tags(data_dir):
    tok = Tokenizer.from_file(str(TokenData(data_dir).tokenizer_path))
    probe = brown_probe_set(Path("data/brown-tagged.tsv.xz"), tok, 512, 16, 4, words_per_doc=40)
    first = tok.decode(probe.tokens[0, :8].tolist())
    assert first.startswith("The Fulton")  # ca01 opens the corpus: The/at Fulton/np-tl ...
    assert probe.labels["pos:determiner"][0, 0] == 1 and probe.labels["pos:noun"][0, 0] == 0
    assert probe.labels["genre:fiction"][0].eq(0).all()  # genre a: press reportage
    assert set(probe.labels["pos:verb"].unique().tolist()) <= {-1, 0, 1}
