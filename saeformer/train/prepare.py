"""Turn text into token shards: a byte-level BPE tokenizer, train.bin / val.bin and meta.json."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import tokenizers
from datasets import Dataset, Features, Value, concatenate_datasets, load_dataset
from datasets.arrow_writer import SchemaInferenceError
from datasets.exceptions import DatasetGenerationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from saeformer.atomic import atomic_dir
from saeformer.errors import UserError

EOS = "<|endoftext|>"
FORMAT = "saeformer-tokens/1"
MIN_VOCAB = 257  # the 256 byte symbols plus the end-of-text token
MAX_VOCAB = 1 << 20
BATCH = 1000
KINDS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSION = (".xz", ".gz", ".bz2")
_EMPTY = Dataset.from_dict({"text": []}, features=Features({"text": Value("string")}))


@dataclass
class PrepareConfig:
    """What to tokenize, with which tokenizer, and where to write the shards."""

    out_dir: Path
    sources: list[str] = field(default_factory=list)
    tokenizer: Path | None = None
    vocab_size: int = 8192
    val_fraction: float = 0.02
    max_chars: int | None = None
    text_field: str = "text"
    overwrite: bool = False

    def validate(self) -> None:
        """Raise UserError for values that cannot work, before any work starts."""
        if not MIN_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise UserError(
                f"vocab_size must be in [{MIN_VOCAB}, {MAX_VOCAB}], got {self.vocab_size}"
            )
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_chars is not None and self.max_chars < 1:
            raise UserError(f"max_chars must be positive, got {self.max_chars}")
        if not self.text_field:
            raise UserError("text_field must not be empty")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise UserError(f"tokenizer file not found: {self.tokenizer}")
        _check_out_dir(Path(self.out_dir), self.overwrite)
        resolve_sources(self.sources)


@dataclass(frozen=True)
class Source:
    """A named source: local files, read in this order, or a hub dataset when `files` is empty."""

    name: str
    files: tuple[Path, ...]


@dataclass
class _Records:
    """A source's text records (one column, "text"), in order, with the held-out tail size."""

    source: Source
    texts: Dataset
    eod: np.ndarray  # True where a record ends a document
    chars: int
    n_val: int

    @property
    def n_train(self) -> int:
        """Records in the training part (the head)."""
        return len(self.texts) - self.n_val

    def part(self, split: str) -> tuple[Dataset, np.ndarray]:
        """One split's records and end-of-document flags; a split always ends a document."""
        lo, hi = (0, self.n_train) if split == "train" else (self.n_train, len(self.texts))
        eod = self.eod[lo:hi].copy()
        eod[-1] = True
        return self.texts.select(range(lo, hi)), eod


def bundled_data_dir() -> Path:
    """The bundled corpus folder: $SAEFORMER_DATA_DIR, else `data/` at the repository root."""
    env = os.environ.get("SAEFORMER_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def resolve_sources(specs: list[str]) -> list[Source]:
    """Turn source strings into Sources; no strings means the bundled corpus."""
    if specs:
        return [_resolve(str(spec)) for spec in specs]
    root = bundled_data_dir()
    files = sorted(root.glob("*.txt.xz"))
    if not files:
        raise UserError(
            f"no bundled corpus (*.txt.xz) in {root}; set SAEFORMER_DATA_DIR or name sources"
        )
    return [Source(f.name.removesuffix(".txt.xz"), (f,)) for f in files]


def prepare_corpus(cfg: PrepareConfig) -> Path:
    """Tokenize the sources into `cfg.out_dir` (built beside it, then renamed into place)."""
    cfg.validate()
    out = Path(cfg.out_dir)
    sources = resolve_sources(cfg.sources)
    with atomic_dir(out) as tmp:
        _build(cfg, sources, tmp)
    return out


def _build(cfg: PrepareConfig, sources: list[Source], tmp: Path) -> None:
    """Read, split, tokenize and write every output file into `tmp`."""
    started = time.time()
    cache = _cache_dir(tmp)
    with _quiet_datasets():
        corpora = [
            _read(src, cfg, cache)
            for src in tqdm(sources, desc="reading", unit="source", disable=None)
        ]
    tok = (
        _load_tokenizer(Path(cfg.tokenizer))
        if cfg.tokenizer
        else _train_tokenizer(corpora, cfg.vocab_size)
    )
    tok.save(str(tmp / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    eos = tok.token_to_id(EOS)
    counts = {
        split: _write_split(corpora, split, tok, eos, dtype, tmp / f"{split}.bin")
        for split in ("train", "val")
    }
    meta = {
        "format": FORMAT,
        "vocab_size": vocab,
        "dtype": dtype.name,
        "eos_token": EOS,
        "eos_id": eos,
        "bos_id": eos,
        "tokenizer": "tokenizer.json",
        "tokenizer_origin": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else "trained",
        "n_tokens": {split: sum(c) for split, c in counts.items()},
        "val_fraction": cfg.val_fraction,
        "max_chars": cfg.max_chars,
        "text_field": cfg.text_field,
        "sources": [
            _source_meta(c, counts["train"][i], counts["val"][i]) for i, c in enumerate(corpora)
        ],
        "created": _creation_info(started),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if cache is not None:
        shutil.rmtree(cache)


def _resolve(spec: str) -> Source:
    """A file, a folder of files (sorted, hidden skipped), or a hub dataset "name[:config]"."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and _kind(p)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"no .txt, .jsonl or .parquet files in folder {spec}")
        return Source(spec, tuple(files))
    if path.is_file():
        if _kind(path) is None:
            raise UserError(
                f"unsupported source file {spec}: use .txt, .jsonl or .parquet (.xz/.gz/.bz2 too)"
            )
        return Source(spec, (path,))
    if _kind(path) is not None or spec.startswith((".", "/", "~")):
        raise UserError(f"source not found: {spec}")
    return Source(spec, ())


def _kind(path: Path) -> str | None:
    """The `datasets` builder for a file name ("text", "json" or "parquet"), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    return KINDS.get(suffixes[-1]) if suffixes else None


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless overwriting earlier shards (it has meta.json)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"out_dir {out} exists and is not empty (set overwrite to replace it)")
    if not (out / "meta.json").is_file():
        raise UserError(f"out_dir {out} holds no prepared shards (no meta.json): not replacing it")


def _cache_dir(tmp: Path) -> Path | None:
    """Where `datasets` caches: the user's configured cache, else a folder inside the build."""
    if "HF_DATASETS_CACHE" in os.environ or "HF_HOME" in os.environ:
        return None
    return tmp / ".hf_cache"


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the progress bars of `datasets` (ours show progress), restoring them after."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _read(src: Source, cfg: PrepareConfig, cache: Path | None) -> _Records:
    """Load a source's non-empty records, cap them at `max_chars` and size the held-out tail."""
    parts = (
        [_load_file(f, cfg.text_field, cache) for f in src.files]
        if src.files
        else [_load_hub(src.name, cfg, cache)]
    )
    texts = concatenate_datasets([p[0] for p in parts])
    eod = np.concatenate([p[1] for p in parts])
    lengths = np.concatenate([_lengths(p[0]) for p in parts])
    keep = np.flatnonzero(lengths)
    if not len(keep):
        raise UserError(f"source {src.name} is empty: it contains no text")
    if len(keep) < len(lengths):
        texts, eod, lengths = texts.select(keep), eod[keep], lengths[keep]
    if cfg.max_chars is not None:
        texts, eod, lengths = _cap(texts, eod, lengths, cfg.max_chars)
    if len(texts) < 2:
        raise UserError(
            f"source {src.name} has one line or document only: too small for a validation split"
        )
    n_val = min(len(texts) - 1, max(1, round(len(texts) * cfg.val_fraction)))
    return _Records(src, texts, eod, int(lengths.sum()), n_val)


def _load_file(path: Path, text_field: str, cache: Path | None) -> tuple[Dataset, np.ndarray]:
    """One file as (records, end-of-document flags): a text file is one document, a row is one."""
    kind = _kind(path)
    options = {"keep_linebreaks": True} if kind == "text" else {}
    try:
        ds = load_dataset(
            kind, data_files=[str(path)], split="train", cache_dir=_str(cache), **options
        )
    except Exception as exc:
        if any(isinstance(e, SchemaInferenceError) for e in _chain(exc)):
            return _EMPTY, np.zeros(0, bool)
        raise UserError(f"cannot read {path}: {_reason(exc)}") from exc
    ds = _text_column(ds, "text" if kind == "text" else text_field, str(path))
    eod = np.ones(len(ds), bool) if kind != "text" else np.arange(len(ds)) == len(ds) - 1
    return ds, eod


def _load_hub(spec: str, cfg: PrepareConfig, cache: Path | None) -> tuple[Dataset, np.ndarray]:
    """The train split of a hub dataset ("name" or "name:config"); each row is one document."""
    name, _, config = spec.partition(":")
    try:
        ds = load_dataset(name, config or None, split="train", cache_dir=_str(cache))
    except Exception as exc:
        raise UserError(
            f"{spec} is no local file or folder, and loading it as a hub dataset failed:"
            f" {_reason(exc)}"
        ) from exc
    ds = _text_column(ds, cfg.text_field, spec)
    return ds, np.ones(len(ds), bool)


def _str(path: Path | None) -> str | None:
    """A path as the string `datasets` expects, keeping None."""
    return None if path is None else str(path)


def _text_column(ds: Dataset, text_field: str, name: str) -> Dataset:
    """Keep only the text field, as a "text" column of type string."""
    if text_field not in ds.column_names:
        raise UserError(
            f"{name} has no field '{text_field}' (fields: {', '.join(ds.column_names)});"
            " set text_field"
        )
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise UserError(
            f"field '{text_field}' of {name} is not text (it holds {ds.features[text_field]})"
        )
    ds = (
        ds.select_columns([text_field]).rename_column(text_field, "text")
        if text_field != "text"
        else ds.select_columns(["text"])
    )
    return ds.cast_column("text", Value("string")) if dtype != "string" else ds


def _lengths(ds: Dataset) -> np.ndarray:
    """Characters in each record (a missing text counts as empty)."""
    return pc.utf8_length(ds.data.column("text")).fill_null(0).to_numpy().astype(np.int64)


def _cap(
    texts: Dataset, eod: np.ndarray, lengths: np.ndarray, max_chars: int
) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """Keep the first `max_chars` characters, cutting the last record kept if needed."""
    total = np.cumsum(lengths)
    last = int(np.searchsorted(total, max_chars))
    if last >= len(texts):
        return texts, eod, lengths
    keep = max_chars - (int(total[last - 1]) if last else 0)
    cut = Dataset.from_dict({"text": [texts[last]["text"][:keep]]}, features=texts.features)
    lengths = np.append(lengths[:last], keep)
    return concatenate_datasets([texts.select(range(last)), cut]), eod[: last + 1], lengths


def _load_tokenizer(path: Path) -> Tokenizer:
    """An existing tokenizer.json, with the end-of-text token added if it lacks one."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise UserError(f"cannot read tokenizer {path}: {_reason(exc)}") from exc
    if tok.token_to_id(EOS) is None:
        tok.add_special_tokens([EOS])
    return tok


def _train_tokenizer(corpora: list[_Records], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on the training records only (validation text stays unseen)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    texts = (batch for c in corpora for batch, _ in _batches(*c.part("train")))
    tok.train_from_iterator(texts, trainer=trainer, length=sum(c.n_train for c in corpora))
    return tok


def _batches(texts: Dataset, eod: np.ndarray) -> Iterator[tuple[list[str], np.ndarray]]:
    """Records in batches of BATCH, as (texts, end-of-document flags)."""
    for start in range(0, len(texts), BATCH):
        yield texts[start : start + BATCH]["text"], eod[start : start + BATCH]


def _write_split(
    corpora: list[_Records], split: str, tok: Tokenizer, eos: int, dtype: np.dtype, path: Path
) -> list[int]:
    """Tokenize one split of every source into `path`; return the token count per source."""
    counts = []
    total = sum(c.n_train if split == "train" else c.n_val for c in corpora)
    with (
        path.open("wb") as f,
        tqdm(total=total, desc=f"tokenizing {split}", unit="rec", disable=None) as bar,
    ):
        for c in corpora:
            n = 0
            for batch, ends in _batches(*c.part(split)):
                ids = _encode(tok, batch, ends, eos)
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
                bar.update(len(batch))
            counts.append(n)
    return counts


def _encode(tok: Tokenizer, texts: list[str], ends: np.ndarray, eos: int) -> list[int]:
    """Token ids of a batch of records, with the end-of-text token after each document."""
    ids: list[int] = []
    for enc, end in zip(tok.encode_batch_fast(texts), ends, strict=True):
        ids.extend(enc.ids)
        if end:
            ids.append(eos)
    return ids


def _source_meta(c: _Records, train_tokens: int, val_tokens: int) -> dict:
    """What meta.json records about one source."""
    return {
        "name": c.source.name,
        "files": [str(f.resolve()) for f in c.source.files],
        "records": len(c.texts),
        "val_records": c.n_val,
        "chars": c.chars,
        "n_tokens": {"train": train_tokens, "val": val_tokens},
    }


def _creation_info(started: float) -> dict:
    """When and with what the shards were made."""
    return {
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 2),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
    }


def _chain(exc: BaseException) -> list[BaseException]:
    """An exception and the ones it was raised from."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _reason(exc: BaseException) -> str:
    """One line saying why reading failed."""
    chain = _chain(exc)
    if any(isinstance(e, UnicodeDecodeError) for e in chain):
        return "not UTF-8 text"
    cause = next((e for e in chain if not isinstance(e, DatasetGenerationError)), exc)
    lines = str(cause).strip().splitlines()
    kind = "" if type(cause) is Exception else f"{type(cause).__name__}: "
    return f"{kind}{lines[0] if lines else ''}".rstrip(": ")
