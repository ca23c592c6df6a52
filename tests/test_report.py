"""The report of a tiny real run: feature cards, escaping, and a headless-browser load."""

import html
import json
import lzma
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from saeformer import load_run
from saeformer.analysis.report import js_data
from saeformer.analysis.snapshot import list_snapshots, load_probe, load_snapshot
from saeformer.cli import main
from saeformer.train.config import load_config
from saeformer.train.prepare import PrepareConfig, bundled_data_dir, prepare_corpus
from saeformer.train.trainer import Trainer

SCRIPT = "<script>alert(1)</script>"
CONFIG = """
[model]
n_layers = 2
d_model = 32
n_heads = 2
d_ff = 64
context = 32

[[model.bottleneck]]
site = "resid"
layer = 0
width = 48
k = 6

[[model.bottleneck]]
site = "mlp"
layer = 1
width = 64
k = 6

[data]
dir = "{data}"

[train]
steps = 24
batch_size = 8
lr = 3e-3
warmup_steps = 4
eval_every = 12
eval_batches = 1
log_every = 4
ckpt_every = 12
keep_last = 3
threads = 1

[strategy]
alpha_warmup_steps = 6
aux_coef = 0.03
k_aux = 16
dead_tokens = 2000

[snapshot]
every = 10
log_spaced = true
probe_windows = 12
top_m = 8
window = 4
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run trained on text with a script tag after every third line."""
    root = tmp_path_factory.mktemp("report")
    with lzma.open(bundled_data_dir() / "austen.txt.xz", "rt", encoding="utf-8") as fh:
        lines = fh.read(30_000).splitlines()
    text = "\n".join(f"{line}\n{SCRIPT}" if i % 3 == 0 else line for i, line in enumerate(lines))
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    data = root / "data"
    prepare_corpus(PrepareConfig(out_dir=data, sources=[str(root / "corpus.txt")], vocab_size=400))
    (root / "tiny.toml").write_text(CONFIG.format(data=data))
    Trainer(load_config(root / "tiny.toml"), root / "run").run()
    (root / "rows.json").write_text(json.dumps(COMPARE_ROWS))
    assert main(["report", str(root / "run"), "--all", "--compare", str(root / "rows.json")]) == 0
    return root / "run"


COMPARE_ROWS = [  # as `saeformer compare --json` writes them
    {"name": f"joint {SCRIPT}", "hook": "layers.0.output", "width": 48, "k": 6, "fvu": 1.25,
     "l0": 6.0, "dead_frac": 0.125, "ce": 3.5, "pos:noun@k=1": 0.75, "pos:verb@k=1": 0.5},
    {"name": "post-hoc", "hook": "layers.0.output", "width": 64, "k": 6, "fvu": 0.0625,
     "l0": 5.5, "dead_frac": 0.0, "ce_clean": 3.0, "ce_spliced": 3.25, "ce_score": 0.875,
     "kl": 0.03125, "stable_frac": 0.5, "match_cosine_median": 0.875},
]  # fmt: skip


def test_report_shows_the_comparison_tables(run, tmp_path, capsys):
    section = _data(run / "report" / "data" / "run.js")["compare"]
    recon, quality = section["tables"]
    assert recon["header"][:5] == ["entry", "hook", "F", "k", "FVU"]
    assert recon["rows"][0] == [
        f"joint {SCRIPT}", "layers.0.output", "48", "6", "1.250", "6.0", "12.5", "—", "3.500",
        "—", "—",
    ]  # fmt: skip
    assert recon["rows"][1][7:] == ["3.000", "3.250", "0.875", "0.0312"]
    assert quality["header"][3] == "POS k=1" and quality["rows"][0][3] == "0.625"  # mean of 2
    assert quality["rows"][1][2] == "50.0% (0.88)"
    (tmp_path / "bad.json").write_text('{"rows": 1}')
    assert (
        main(
            [
                "report",
                str(run),
                "--out",
                str(tmp_path / "r"),
                "--compare",
                str(tmp_path / "bad.json"),
            ]
        )
        == 2
    )
    assert "not the output of `saeformer compare --json`" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _data(path: Path):
    """The value a report data file passes to SAEF.add."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("SAEF.add(...") and text.endswith(");\n")
    return json.loads(text[len("SAEF.add(...") : -3])[1]


def test_training_wrote_snapshots_on_schedule(run):
    assert list_snapshots(run) == [1, 2, 4, 8, 10, 16, 20, 24]
    assert load_probe(run).shape == (12, 33)
    meta = json.loads((run / "snapshots" / "step_24" / "resid.0" / "meta.json").read_text())
    assert meta["width"] == 48 and meta["top_m"] == 8 and 0 < meta["bytes"] < 100_000


def test_snapshot_command_from_a_checkpoint(run, capsys):
    shutil.rmtree(run / "snapshots" / "step_12", ignore_errors=True)
    assert main(["snapshot", str(run), "--step", "12"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"wrote .*step_12 \(\d+\.\d\d MB\)", out), out
    model = load_run(run, step=12).model
    snap = load_snapshot(run, 12, "mlp.1", ("decoder",))
    torch.testing.assert_close(
        snap.tensors["decoder"].float(), model.blocks[1].mlp.W_dec, rtol=1e-3, atol=1e-5
    )
    shutil.rmtree(run / "snapshots" / "step_12")


def test_report_holds_a_card_per_feature_with_its_real_contexts(run):
    report = run / "report"
    info = _data(report / "data" / "run.js")
    vocab = _data(report / "data" / "vocab.js")
    assert [s["id"] for s in info["sites"]] == ["resid.0", "mlp.1"]
    assert info["sites"][0]["title"] == "Layer 0 resid" and info["sites"][1]["unit"] == "Neuron"
    probe = load_probe(run)[:, :-1].reshape(-1)
    for site in info["sites"]:
        bid = site["id"]
        index = _data(report / "data" / bid / "index.js")
        assert len(index["density"]) == site["width"] and site["cards"] == site["width"]
        cards = {}
        for chunk in sorted(set(index["card"])):
            cards.update(_data(report / "data" / bid / f"cards_{chunk}.js"))
        assert sorted(map(int, cards)) == list(range(site["width"]))
        final = load_snapshot(run, 24, bid).tensors
        for fid, card in cards.items():
            f = int(fid)
            assert card["density"] == pytest.approx(final["frequency"][f].item(), rel=1e-3)
            assert len(card["contexts"]) == int((final["top_positions"][f] >= 0).sum())
            for j, ctx in enumerate(card["contexts"]):
                top = int(final["top_positions"][f, j])
                assert ctx["tokens"][ctx["center"]] == probe[top].item()
                assert ctx["acts"][ctx["center"]] <= 255 and max(ctx["acts"]) <= 255
            assert [t for t, _ in card["promoted"]] == final["promoted_ids"][f].tolist()
            assert len(card["timeline"]) >= 1 and card["timeline"][-1]["step"] == 24
        assert (report / site["evolution_png"]).stat().st_size > 10_000
    assert any("script" in t for t in vocab)


def test_data_files_never_carry_raw_markup(run):
    for path in (run / "report" / "data").rglob("*.js"):
        text = path.read_text(encoding="utf-8")
        assert "<" not in text and ">" not in text, path
    assert js_data("k", {"a": "</script><b>&"}) == (
        'SAEF.add(...["k",{"a":"\\u003c/script\\u003e\\u003cb\\u003e\\u0026"}]);\n'
    )
    page = (run / "report" / "report.html").read_text(encoding="utf-8")
    assert "<title>saeformer report: run</title>" in page


def _feature_with_script(run: Path) -> tuple[str, int]:
    """A (bottleneck, feature) whose top contexts show the script tag."""
    vocab = _data(run / "report" / "data" / "vocab.js")
    for bid in ("resid.0", "mlp.1"):
        for chunk in sorted((run / "report" / "data" / bid).glob("cards_*.js")):
            for fid, card in _data(chunk).items():
                if any(SCRIPT in "".join(vocab[t] for t in c["tokens"]) for c in card["contexts"]):
                    return bid, int(fid)
    raise AssertionError("no feature's top contexts contain the script line")


class _Text(HTMLParser):
    """Collects the text of a page and the script elements' sources."""

    def __init__(self) -> None:
        super().__init__()
        self.text, self.scripts, self.inline = [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append(dict(attrs).get("src"))
            self._in_script = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        (self.inline if self._in_script else self.text).append(data)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (CI installs it: apt-get install chromium)",
)
def test_headless_browser_loads_the_report_without_errors(run, tmp_path):
    assert CHROMIUM is not None, "CI must have chromium (see .ci/run)"
    bid, feature = _feature_with_script(run)
    url = (run / "report" / "report.html").resolve().as_uri() + f"#{bid}/{feature}"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = result.stdout
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert result.returncode == 0 and not console, console or result.stderr[-2000:]
    assert 'data-ready="1"' in dom and "data-error" not in dom
    parsed = _Text()
    parsed.feed(dom)
    text = html.unescape("".join(parsed.text))
    assert f"Feature {feature}" in text or f"Neuron {feature}" in text
    assert "Token Entropy" in text and "Top activations on the probe set" in text
    assert "Joint bottlenecks vs post-hoc SAEs" in text and f"joint {SCRIPT}" in text
    assert SCRIPT in text  # shown as text ...
    assert "alert" not in "".join(parsed.inline)  # ... and never as a script
    assert all(src and not src.startswith("http") for src in parsed.scripts)


def test_generate_is_greedy_at_temperature_zero(run, capsys):
    loaded = load_run(run)
    ids = loaded.tokenizer.encode("It is a truth").ids
    for _ in range(6):
        logits = loaded.model(torch.tensor([ids[-32:]])).logits[0, -1]
        ids.append(int(logits.argmax()))
    argv = ["generate", str(run), "It is a truth", "--temperature", "0", "--max-new-tokens", "6"]
    assert main(argv) == 0
    assert capsys.readouterr().out == loaded.tokenizer.decode(ids) + "\n"


def test_eval_inspect_and_steer_commands(run, tmp_path, capsys):
    loaded = load_run(run)
    text = "Emma Woodhouse, handsome, clever, and rich."
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = torch.tensor(loaded.tokenizer.encode(text).ids)
    ce = torch.nn.functional.cross_entropy(loaded.model(ids[None, :-1]).logits[0], ids[1:])
    assert main(["eval", str(run), str(tmp_path / "t.txt")]) == 0
    out = capsys.readouterr().out
    assert f"{len(ids) - 1:,} tokens, CE {ce.item():.4f}" in out and "perplexity" in out
    assert main(["inspect", str(run), text, "--top", "2", "--bottleneck", "resid.0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["token", "resid.0"] and len(lines) == len(ids) + 1
    site = loaded.model(ids[None], keep_codes=True).sites["resid.0"]
    best = site.indices[0][site.values[0].argmax()].item()
    assert lines[1].split()[1].startswith(f"{best}:")
    argv = ["steer", str(run), "--bottleneck", "resid.0", "--feature", "3", "--value", "4", "Emma"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "unsteered: " in out and "steered: " in out and "resid.0 feature 3 = 4.0" in out
