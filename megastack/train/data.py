"""Data: a sentencepiece tokenizer, Megatron indexed datasets (.bin/.idx), and GPTDataset batches.

``megastack data [INPUTS...] --out DIR`` trains a BPE sentencepiece model on text/jsonl files (or, with
no inputs, on the demo corpus: a fixed, sorted subset of the Python standard library's own source,
present on every machine) and writes ``DIR/tokenizer.model`` and ``DIR/corpus.{bin,idx}`` with
megatron-core's ``IndexedDatasetBuilder``. Training reads them through megatron-core's
``BlendedMegatronDatasetBuilder`` + ``GPTDataset``: blend weights, train/valid/test split and
seeded shuffling are megatron's own. Every output directory is built beside its final name and
renamed when complete, so a crash never leaves a half-written dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megastack.errors import UserError
from megastack.fsio import atomic_write_bytes, atomic_write_json, building_dir

DEMO_VERSION = 1
DEMO_MAX_BYTES = 6_000_000  # about 2M tokens at vocab 1024: enough for the tiny models' minute-long runs
DEMO_SKIP_DIRS = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "__pycache__",
    "lib2to3",
    "ensurepip",
    "turtledemo",
    "tkinter",
    "dist-packages",
}
TOKENIZER_FILE = "tokenizer.model"
CORPUS_PREFIX = "corpus"
INFO_FILE = "data.json"


# ----------------------------------------------------------------------------- inputs


def demo_corpus_files(max_bytes: int = DEMO_MAX_BYTES) -> list[Path]:
    """The demo corpus: standard-library .py files in sorted path order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    total = 0
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in DEMO_SKIP_DIRS)
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            path = Path(directory) / name
            size = path.stat().st_size
            if total + size > max_bytes:
                return files
            files.append(path)
            total += size
    return files


def input_files(inputs: list[str]) -> list[Path]:
    """Files named, or found (sorted) under directories named; text is .txt/.py/.md/..., jsonl is .jsonl."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"{path}: directory holds no files; pass text or jsonl files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: input not found; pass existing text or jsonl files or directories")
    return files


def documents(files: list[Path]) -> Iterator[str]:
    """One document per text file, one per jsonl line (its "text" field)."""
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({type(exc).__name__})") from None
        if b"\x00" in raw[: 1 << 16]:  # text has no NUL bytes; sentencepiece would train pieces of binary junk
            raise UserError(f"{path}: binary data, not text (NUL bytes at the start); pass text or jsonl files")
        text = raw.decode("utf-8", errors="replace")
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(
                        f'{path}:{number}: not valid JSON; each jsonl line must be an object with a "text" field'
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f'{path}:{number}: needs a string "text" field')
                yield record["text"]
        elif text.strip():
            yield text


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(files: list[Path], model_path: Path, vocab_size: int, max_lines: int = 300_000) -> None:
    """BPE sentencepiece on the inputs' lines; code-friendly: identity normalisation, whitespace kept,
    newline a symbol, byte fallback (every byte is representable). Deterministic for the same input."""
    import sentencepiece as spm

    failure: list[UserError] = []
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        try:
            for doc in documents(files):
                for line in doc.splitlines():
                    if line.strip():
                        yield line
                        count += 1
                        if count >= max_lines:
                            return
        except UserError as exc:  # sentencepiece would wrap it in a RuntimeError with a traceback
            failure.append(exc)
            raise

    if vocab_size < 300:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 256 + specials; use >= 300")
    model = io.BytesIO()  # written through a buffer: the file then holds no path, so it is reproducible
    try:
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(),
                model_writer=model,
                vocab_size=vocab_size,
                model_type="bpe",
                character_coverage=1.0,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                user_defined_symbols=["\n"],
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                num_threads=1,
                shuffle_input_sentence=False,
                minloglevel=2,
            )
    except RuntimeError as exc:
        if failure:
            raise failure[0] from None
        if count == 0:
            names = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
            raise UserError(f"the inputs ({names}) hold no text; pass non-empty text or jsonl files") from None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", text)
        if too_high:
            raise UserError(
                f"--vocab-size {vocab_size} is too large for these inputs: sentencepiece can make at "
                f"most {too_high.group(2)} pieces from them; use --vocab-size {too_high.group(2)} or "
                "less, or give more text"
            ) from None
        needed = re.search(r"required_chars\. (\d+) vs (\d+)", text)
        if needed:
            raise UserError(
                f"--vocab-size {vocab_size} is too small for these inputs: they hold "
                f"{needed.group(2)} distinct characters and pieces; use --vocab-size "
                f"{int(needed.group(2)) + 64} or more"
            ) from None
        reason = text.split("] ", 1)[-1][:200]
        raise UserError(
            f"sentencepiece could not train a tokenizer on the inputs ({reason}); check that they "
            "are text and the --vocab-size fits them"
        ) from None
    atomic_write_bytes(model_path, model.getvalue())


class Tokenizer:
    """A sentencepiece model as megatron's GPTDataset wants it: vocab_size, eod, a stable identity."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: tokenizer file not found; run 'megastack data' or set data.tokenizer")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError):
            raise UserError(
                f"{self.path}: not a sentencepiece model; set data.tokenizer to the .model file "
                "written by 'megastack data'"
            ) from None
        self.vocab_size = int(self.sp.get_piece_size())
        self.eod = int(self.sp.eos_id())
        with open(self.path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        # GPTDataset hashes this into its cache key: the content, not the path, identifies the tokenizer.
        self.unique_identifiers = {"class": "sentencepiece", "sha256": digest, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# ----------------------------------------------------------------------------- indexed datasets


def write_indexed(files: list[Path], tokenizer: Tokenizer, prefix: Path) -> dict[str, int]:
    """Tokenise every document (end-of-document token appended) into megatron's .bin/.idx at ``prefix``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=dtype)
    docs = tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal docs, tokens
        for ids in tokenizer.sp.encode(batch):
            ids = ids + [tokenizer.eod]
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            docs += 1
            tokens += len(ids)
        batch.clear()

    for doc in documents(files):
        batch.append(doc)
        if len(batch) >= 64:
            flush()
    if batch:
        flush()
    if docs == 0:
        raise UserError("the inputs hold no text; nothing to tokenise")
    builder.finalize(get_idx_path(str(prefix)))
    return {"documents": docs, "tokens": tokens}


def prepare(files: list[Path], out: Path, vocab_size: int, source: str) -> dict[str, Any]:
    """Tokenizer + indexed dataset into ``out`` (built at a temporary sibling, renamed when complete)."""
    with building_dir(out) as tmp:
        train_tokenizer(files, tmp / TOKENIZER_FILE, vocab_size)
        tokenizer = Tokenizer(tmp / TOKENIZER_FILE)
        stats = write_indexed(files, tokenizer, tmp / CORPUS_PREFIX)
        info = {
            "source": source,
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            **stats,
            "tokenizer_sha256": tokenizer.unique_identifiers["sha256"],
        }
        atomic_write_json(tmp / INFO_FILE, info)
    return info


def cache_root() -> Path:
    return Path(os.environ.get("MEGASTACK_CACHE", Path.home() / ".cache" / "megastack"))


def demo_data(vocab_size: int = 1024, max_bytes: int = DEMO_MAX_BYTES) -> Path:
    """The prepared demo corpus directory (tokenizer.model, corpus.bin/.idx), built once per machine.

    The cache key covers the file list and sizes, so a different Python gives a different directory;
    a lock file keeps two processes from building it at once."""
    files = demo_corpus_files(max_bytes)
    key = hashlib.sha256(
        json.dumps(
            [DEMO_VERSION, vocab_size, sys.version_info[:2], [(str(p.name), p.stat().st_size) for p in files]]
        ).encode()
    ).hexdigest()[:12]
    out = cache_root() / f"demo-v{DEMO_VERSION}-{vocab_size}-{key}"
    if (out / INFO_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / INFO_FILE).is_file():
            prepare(files, out, vocab_size, source="python-stdlib")
    return out


# ----------------------------------------------------------------------------- GPTDataset


@dataclass
class Datasets:
    train: Any
    valid: Any | None
    tokenizer: Tokenizer
    prefixes: list[str]


INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core's indexed dataset, version 1
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron's DType codes -> bytes


def check_indexed(prefix: str) -> None:
    """The .idx header and both files' sizes agree (megatron's reader would fail with a bare struct or
    assertion error on a truncated or foreign file)."""
    import struct

    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")

    def corrupt(why: str) -> UserError:
        return UserError(
            f"data.prefixes: {idx} is not a valid Megatron indexed dataset ({why}); re-run "
            "'megastack data' to write it again"
        )

    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != INDEX_HEADER:
        raise corrupt("bad header")
    version, code, sequences, documents_ = struct.unpack("<QBQQ", head[9:34])
    if version != 1 or code not in DTYPE_SIZES:
        raise corrupt(f"version {version}, dtype code {code}")
    expected = 34 + sequences * (4 + 8) + documents_ * 8
    if idx.stat().st_size < expected:
        raise corrupt(f"{idx.stat().st_size} bytes, the header needs {expected}")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=34, shape=(sequences,)) if sequences else []
    tokens = int(np.sum(lengths, dtype=np.int64))
    if bin_.stat().st_size != tokens * DTYPE_SIZES[code]:
        raise UserError(
            f"data.prefixes: {bin_} holds {bin_.stat().st_size} bytes but {idx} describes "
            f"{tokens * DTYPE_SIZES[code]}; the pair is truncated or mismatched, re-run 'megastack data'"
        )


def resolve_data(
    prefixes: list[str], tokenizer_path: str | None, vocab_size: int, demo_bytes: int = DEMO_MAX_BYTES
) -> tuple[list[str], Tokenizer]:
    """Dataset prefixes and tokenizer; the demo corpus when no prefixes are given. Checks files and vocab."""
    if not prefixes:
        directory = demo_data(vocab_size if vocab_size >= 300 else 1024, demo_bytes)
        prefixes = [str(directory / CORPUS_PREFIX)]
        tokenizer_path = tokenizer_path or str(directory / TOKENIZER_FILE)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise UserError(
                    f"data.prefixes: {prefix}{suffix} not found; give the prefix of a .bin/.idx pair "
                    "written by 'megastack data' (without the suffix)"
                )
        check_indexed(prefix)
    if tokenizer_path is None:
        guess = Path(prefixes[0]).parent / TOKENIZER_FILE
        if not guess.is_file():
            raise UserError(
                f"data.tokenizer is not set and {guess} does not exist; set data.tokenizer to the "
                "sentencepiece .model the data was written with"
            )
        tokenizer_path = str(guess)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != vocab_size:
        raise UserError(
            f"data.tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {vocab_size}; use the tokenizer the model was built for or set "
            f"model.vocab_size to {tokenizer.vocab_size}"
        )
    return prefixes, tokenizer


def _check_split_documents(prefixes: list[str], split: str) -> None:
    """Every split with a share gets at least one document of every corpus, by megatron's own rounding:
    megatron builds each such split (sized at least 1 sample here), and an empty one has zero tokens per
    epoch, so its sample index counts epochs forever."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError):
        raise UserError(f"data.split '{split}': give three non-negative shares, e.g. '98,2,0'") from None
    for prefix in prefixes:
        documents = len(IndexedDataset(prefix).sequence_lengths)
        for index, name in enumerate(("train", "valid", "test")):
            if matrix[index] is None:
                continue
            begin, end = (int(round(x * documents)) for x in matrix[index])
            if end <= begin:
                raise UserError(
                    f"data: {prefix} has {documents} document(s) and data.split '{split}' leaves the "
                    f"{name} split none; give a corpus of more documents (megastack data makes one "
                    "per file or jsonl line) or change data.split"
                )


def build_datasets(
    prefixes: list[str],
    weights: list[float] | None,
    split: str,
    tokenizer: Tokenizer,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    cache_dir: str | os.PathLike,
) -> Datasets:
    """megatron-core's GPTDatasets for the train and valid splits (call on every rank).

    megatron builds the shuffled index files on global rank 0 first and the other ranks read them."""
    import logging

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for name in ("megatron.core.datasets", "megatron.core.datasets.blended_megatron_dataset_builder"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prefixes), list(weights) if weights else None),
        split=split,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    sizes = [train_samples, max(valid_samples, 1), 1]  # every split sized: megatron needs it with blend weights
    _check_split_documents(prefixes, split)
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    except AssertionError as exc:
        raise UserError(
            f"data: megatron could not build the datasets ({exc}); check data.split and that the "
            "corpus has enough documents for every split with a non-zero weight"
        ) from None
    if train is None or len(train) < train_samples:
        raise UserError(
            f"data: the train split yields {0 if train is None else len(train)} samples but "
            f"{train_samples} are needed; give more data or a larger train share in data.split"
        )
    return Datasets(train, valid, tokenizer, prefixes)


def micro_batch(dataset: Any, start: int, size: int) -> dict[str, torch.Tensor]:
    """Samples ``[start, start + size)`` of a GPTDataset as a batch (tokens, labels, loss_mask)."""
    items = [dataset[i] for i in range(start, start + size)]
    return {key: torch.stack([item[key] for item in items]) for key in ("tokens", "labels", "loss_mask")}


# ----------------------------------------------------------------------------- CLI


def cli_data(args: Any) -> int:
    """``megastack data [INPUTS...] --out DIR [--vocab-size N]``."""
    out = Path(args.out)
    if args.inputs:
        files = input_files(args.inputs)
        source = ",".join(args.inputs)
    else:
        files = demo_corpus_files()
        source = "python-stdlib"
    info = prepare(files, out, args.vocab_size, source)
    print(
        f"wrote {out}/{TOKENIZER_FILE} (vocab {info['vocab_size']}) and {out}/{CORPUS_PREFIX}.bin/.idx "
        f"({info['documents']:,} documents, {info['tokens']:,} tokens from {info['files']} files); train "
        f"with data.prefixes: [{out}/{CORPUS_PREFIX}]"
    )
    return 0
