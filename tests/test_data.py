"""Corpus preparation (token shards, tokenizer, held-out split) and deterministic batch loading."""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from saeformer.errors import UserError
from saeformer.train.data import Batches, TokenData, fixed_windows
from saeformer.train.prepare import EOS, PrepareConfig, bundled_data_dir, prepare_corpus

SLICE = 20_000
BUNDLED = ["austen", "brown", "kjv", "milton", "shakespeare"]


def _prepare(out: Path, **kwargs) -> Path:
    """Prepare with a small vocabulary (fast)."""
    return prepare_corpus(
        PrepareConfig(out_dir=out, vocab_size=kwargs.pop("vocab_size", 512), **kwargs)
    )


def _parts(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each source's (train, val) token ids, sliced by the counts in meta.json."""
    data = TokenData(out)
    offsets = {"train": 0, "val": 0}
    parts = {}
    for src in data.meta["sources"]:
        pair = []
        for split in ("train", "val"):
            n = src["n_tokens"][split]
            pair.append(np.asarray(data.split(split)[offsets[split] : offsets[split] + n]))
            offsets[split] += n
        parts[src["name"]] = tuple(pair)
    return parts


def _decode(tok: Tokenizer, ids: np.ndarray, eos: int) -> str:
    """Text of token ids with the end-of-text tokens left out."""
    return tok.decode([int(i) for i in ids if i != eos], skip_special_tokens=False)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared slice of the bundled corpus."""
    return _prepare(tmp_path_factory.mktemp("bundled") / "out", max_chars=SLICE)


def test_bundled_slice_writes_consistent_files(bundled: Path) -> None:
    meta = json.loads((bundled / "meta.json").read_text())
    assert sorted(p.name for p in bundled.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    assert [s["name"] for s in meta["sources"]] == BUNDLED
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 512
    data = TokenData(bundled)
    assert data.tokenizer_path == bundled / "tokenizer.json"
    for split in ("train", "val"):
        tokens = data.split(split)
        assert tokens.dtype == np.uint16 and len(tokens) == meta["n_tokens"][split]
        assert sum(s["n_tokens"][split] for s in meta["sources"]) == len(tokens)
        assert tokens.max() < data.vocab_size
    assert Tokenizer.from_file(str(data.tokenizer_path)).token_to_id(EOS) == meta["eos_id"]


def test_round_trip_and_contiguous_holdout_from_every_source(bundled: Path) -> None:
    tok = Tokenizer.from_file(str(bundled / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    for name, (train, val) in _parts(bundled).items():
        with lzma.open(bundled_data_dir() / f"{name}.txt.xz", "rt", encoding="utf-8") as f:
            text = f.read(SLICE)
        train_text, val_text = _decode(tok, train, eos), _decode(tok, val, eos)
        assert val_text, f"no validation text from {name}"
        assert train_text + val_text == text
        assert train[-1] == eos and val[-1] == eos


def test_prepare_is_deterministic(bundled: Path, tmp_path: Path) -> None:
    again = _prepare(tmp_path / "again", max_chars=SLICE)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (again / name).read_bytes() == (bundled / name).read_bytes()


def test_local_files_folder_and_existing_tokenizer(bundled: Path, tmp_path: Path) -> None:
    lines = "".join(f"Line {i} of a small text file.\n" for i in range(60))
    (tmp_path / "plain.txt").write_text(lines)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("second file\nends here\n")
    (folder / "a.txt.xz").write_bytes(lzma.compress(b"first file\nhas two lines\n"))
    docs = [f"Document {i}: caf\u00e9 \u00fcber na\u00efve." for i in range(40)] + [""]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), tmp_path / "t.parquet")
    sources = [str(tmp_path / n) for n in ("plain.txt", "folder", "docs.jsonl", "t.parquet")]
    out = _prepare(tmp_path / "out", sources=sources, tokenizer=bundled / "tokenizer.json")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    expected = [lines, "first file\nhas two lines\nsecond file\nends here\n", "".join(docs)]
    parts = _parts(out)
    for (train, val), text in zip(parts.values(), [*expected, expected[-1]], strict=True):
        assert len(val) and _decode(tok, train, eos) + _decode(tok, val, eos) == text
    train, val = parts[sources[2]]
    assert int((train == eos).sum() + (val == eos).sum()) == len(docs) - 1
    assert (out / "tokenizer.json").read_bytes() == (bundled / "tokenizer.json").read_bytes()


def test_out_dir_is_refused_unless_empty_or_overwrite(tmp_path: Path) -> None:
    source = tmp_path / "a.txt"
    source.write_text("some words\n" * 20)
    out = tmp_path / "out"
    out.mkdir()
    _prepare(out, sources=[str(source)])
    with pytest.raises(UserError, match="not empty"):
        _prepare(out, sources=[str(source)])
    _prepare(out, sources=[str(source)], overwrite=True)
    assert TokenData(out).meta["sources"][0]["name"] == str(source)


BAD_INPUTS = {
    "missing file": ({"sources": ["{tmp}/missing.txt"]}, {}),
    "empty file": ({"sources": ["{tmp}/empty.txt"]}, {"empty.txt": b""}),
    "not utf-8": (
        {"sources": ["{tmp}/latin.txt"]},
        {"latin.txt": "caf\u00e9\nx\n".encode("latin-1")},
    ),
    "one record": ({"sources": ["{tmp}/one.txt"]}, {"one.txt": b"a single line"}),
    "vocab too small": ({"vocab_size": 100}, {}),
    "vocab too large": ({"vocab_size": 1 << 21}, {}),
    "val_fraction": ({"val_fraction": 0.0}, {}),
    "bad tokenizer": ({"tokenizer": "{tmp}/tok.json"}, {"tok.json": b"{not json"}),
    "missing tokenizer": ({"tokenizer": "{tmp}/none.json"}, {}),
    "no text field": (
        {"sources": ["{tmp}/d.jsonl"]},
        {"d.jsonl": b'{"body": "x"}\n{"body": "y"}\n'},
    ),
    "unsupported file": ({"sources": ["{tmp}/d.csv"]}, {"d.csv": b"a,b\n"}),
    "empty folder": ({"sources": ["{tmp}/folder"]}, {"folder/notes.md": b"# hi\n"}),
    "overwrite other": ({"overwrite": True}, {"out/notes.md": b"# mine\n"}),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_user_error_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    kwargs, files = BAD_INPUTS[case]
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    kwargs = {k: _fill(v, tmp_path) for k, v in kwargs.items()}
    kwargs.setdefault("max_chars", 2000)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError) as err:
        _prepare(tmp_path / "out", **kwargs)
    assert "\n" not in str(err.value)
    assert sorted(tmp_path.rglob("*")) == before


def _fill(value: object, tmp: Path) -> object:
    """Put the test's folder into "{tmp}" placeholders."""
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    return Path(value.format(tmp=tmp)) if isinstance(value, str) and "{tmp}" in value else value


def test_token_data_rejects_missing_or_corrupt_files(bundled: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no meta.json"):
        TokenData(tmp_path)
    copy = Path(shutil.copytree(bundled, tmp_path / "copy"))
    with pytest.raises(UserError, match="unknown split"):
        TokenData(copy).split("test")
    with (copy / "val.bin").open("r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="val.bin"):
        TokenData(copy)
    (copy / "meta.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        TokenData(copy)


TOKENS = np.arange(1000, dtype=np.uint16)


def test_batch_targets_are_inputs_shifted_by_one() -> None:
    x, y = Batches(TOKENS, context=16, seed=0).samples(0, 8)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 16)
    assert torch.equal(y, x + 1) and torch.all(x[:, 0] % 16 == 0)


def test_batches_are_deterministic_and_resumable() -> None:
    batches = Batches(TOKENS, context=16, seed=7)
    full = batches.samples(5, 100)
    again = Batches(TOKENS, context=16, seed=7).samples(5, 100)
    pieces = [batches.samples(5, 30), batches.samples(35, 70)]
    for whole, other, *parts in zip(full, again, *pieces, strict=True):
        assert torch.equal(whole, other) and torch.equal(whole, torch.cat(parts))
    world, local = 4, 5
    ranks = [batches.samples(40 + rank * local, local)[0] for rank in range(world)]
    assert torch.equal(torch.cat(ranks), batches.samples(40, world * local)[0])
    assert not torch.equal(Batches(TOKENS, 16, seed=8).samples(5, 100)[0], full[0])


def test_batches_wrap_into_new_epochs_with_a_new_order() -> None:
    batches = Batches(TOKENS, context=16, seed=1)
    n = batches.n_windows
    assert n == (len(TOKENS) - 1) // 16
    first, second = batches.samples(0, n)[0][:, 0], batches.samples(n, n)[0][:, 0]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(0, n * 16, 16))
    assert not torch.equal(first, second)
    across = batches.samples(n - 3, 6)[0]
    assert torch.equal(across, torch.cat([batches.samples(n - 3, 3)[0], batches.samples(n, 3)[0]]))


def test_short_split_is_a_user_error() -> None:
    with pytest.raises(UserError, match="fewer than context"):
        Batches(TOKENS[:16], context=16, seed=0)
    assert Batches(TOKENS[:17], context=16, seed=0).n_windows == 1
    with pytest.raises(UserError, match="fewer than context"):
        fixed_windows(TOKENS[:10], context=16, count=2)


def test_fixed_windows_are_evenly_spaced_to_the_end() -> None:
    x, y = fixed_windows(TOKENS, context=16, count=5)
    assert x[:, 0].tolist() == [0, 245, 491, 737, 983]
    assert int(y[-1, -1]) == TOKENS[-1] and torch.equal(y, x + 1)


def test_batches_on_prepared_tokens(bundled: Path) -> None:
    tokens = TokenData(bundled).split("train")
    x, y = Batches(tokens, context=32, seed=0).samples(0, 4)
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < TokenData(bundled).vocab_size
