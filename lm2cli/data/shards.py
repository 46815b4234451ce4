"""Token shards: flat binary token files written by `lm2 tokenize` and read by memmap.

Layout of `data.dir`:

    tokenizer.model      the SentencePiece model (see lm2cli.data.tokenizer for the special ids)
    train.bin, val.bin   every document as BOS tokens EOS, concatenated; uint16 if vocab < 65,536, else uint32
    train.idx, val.idx   raw little-endian uint64: n_documents + 1 offsets; document i is bin[idx[i]:idx[i+1]]
    meta.json            vocabulary, dtype, counts, special ids, tokenizer checksum, fingerprint, source
    recipe.toml          the resolved recipe that produced them

Both delimiters are stored: BOS lets a loader align rows (or memory lanes) to document starts, EOS teaches the
model where documents end so generation can stop there. Readers open files read-only with `np.memmap`, so a
training run never loads a corpus into RAM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lm2cli.errors import Lm2Error
from lm2cli.fileio import temp_file_for

SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<u8")
FORMAT_NAME = "lm2-token-shards"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends encoded documents of one split to temporary files; `commit` moves them into place.

    Until `commit`, nothing under the final names changes, so an interrupted run never leaves a shard that
    looks valid. Memory use is one document's tokens plus the (small) offset list.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype):
        self.out_dir, self.split, self.dtype = Path(out_dir), split, np.dtype(dtype)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, self._tmp_bin = temp_file_for(self.out_dir / f"{split}.bin")
        self._bin = os.fdopen(fd, "wb")
        self._offsets = [0]

    @property
    def n_tokens(self) -> int:
        return self._offsets[-1]

    @property
    def n_documents(self) -> int:
        return len(self._offsets) - 1

    def add(self, ids: np.ndarray) -> None:
        """Append one document, already framed as BOS ... EOS."""
        arr = np.asarray(ids)
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + len(arr))

    def commit(self) -> None:
        from lm2cli.fileio import atomic_write_bytes

        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        os.replace(self._tmp_bin, self.out_dir / f"{self.split}.bin")
        atomic_write_bytes(self.out_dir / f"{self.split}.idx", np.asarray(self._offsets, INDEX_DTYPE).tobytes())

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        Path(self._tmp_bin).unlink(missing_ok=True)


def build_meta(tokenizer, writers: dict[str, ShardWriter], inputs: dict[str, Any], source: dict[str, Any],
               stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """meta.json's content: everything a reader needs without opening the binaries."""
    from lm2cli import __version__
    from lm2cli.data.fingerprint import fingerprint_of

    special = {"unk": tokenizer.unk_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
               "pad": tokenizer.pad_id, "newline": tokenizer.newline_id}
    try:
        special["answer"] = tokenizer.answer_id
    except Lm2Error:
        special["answer"] = None
    return {
        "format": FORMAT_NAME,
        "format_version": inputs["format"],
        "lm2_version": __version__,
        "vocab_size": tokenizer.vocab_size,
        "dtype": writers["train"].dtype.name,
        "document_format": "BOS tokens EOS",
        "special_ids": special,
        "splits": {name: {"tokens": w.n_tokens, "documents": w.n_documents, "bin": f"{name}.bin",
                          "idx": f"{name}.idx"} for name, w in writers.items()},
        "index_format": "raw little-endian uint64, n_documents + 1 token offsets (document i = bin[idx[i]:idx[i+1]])",
        "tokenizer_file": "tokenizer.model",
        "tokenizer_sha256": tokenizer.sha256,
        "fingerprint": fingerprint_of(inputs),
        "fingerprint_inputs": inputs,
        "source": source,
        "stats": stats or {},
    }


def meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a meta.json that claims to be lm2's, or None. Only these values are used to open the
    binaries, so a hand-edited file can choose neither the dtype numpy maps (only uint16/uint32) nor sizes that
    do not add up."""
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= 1 << 32:
        return f"vocab_size = {json.dumps(vocab)[:40]} is not a vocabulary size"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype = {json.dumps(meta.get('dtype'))[:40]}, expected \"uint16\" or \"uint32\""
    if np.dtype(meta["dtype"]).itemsize < token_dtype(vocab).itemsize:
        return f"dtype {meta['dtype']} cannot hold the ids of a {vocab}-piece vocabulary"
    splits = meta.get("splits")
    for split in SPLITS:
        info = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(info, dict) or not all(isinstance(info.get(k), int) and not isinstance(info[k], bool)
                                                 and info[k] >= 0 for k in ("tokens", "documents")):
            return f"splits.{split} must hold non-negative integer \"tokens\" and \"documents\""
    if not isinstance(meta.get("tokenizer_sha256"), str):
        return "tokenizer_sha256 is missing"
    return None


class TokenShards:
    """Read-only view of the shards in a data directory (what `lm2 tokenize` wrote).

        shards = TokenShards("data/small")
        shards.check_matches(recipe)        # Lm2Error if missing, stale or built for another vocabulary
        tokens = shards.split("train")      # np.memmap, read-only, dtype uint16/uint32
        starts = shards.doc_offsets("train")  # uint64, n_documents + 1 entries
        tok = shards.tokenizer()
    """

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise Lm2Error(f"no token shards in {self.dir} (meta.json missing): run `lm2 tokenize RECIPE` first")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Lm2Error(f"{meta_path}: unreadable ({e}); rebuild with `lm2 tokenize RECIPE --force`") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT_NAME:
            raise Lm2Error(f"{meta_path}: not an lm2 token-shard directory; run `lm2 tokenize RECIPE` first")
        problem = meta_problem(self.meta)
        if problem:
            raise Lm2Error(f"{meta_path}: {problem}; rebuild with `lm2 tokenize RECIPE --force`")
        self.vocab_size: int = self.meta["vocab_size"]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def for_recipe(cls, recipe) -> TokenShards:
        """The shards in `recipe.data.dir`, checked against the recipe."""
        shards = cls(recipe.data.dir)
        shards.check_matches(recipe)
        return shards

    # ------------------------------------------------------------------------------------------ access

    def num_tokens(self, split: str) -> int:
        return int(self._split_meta(split)["tokens"])

    def num_documents(self, split: str) -> int:
        return int(self._split_meta(split)["documents"])

    def split(self, split: str) -> np.ndarray:
        """All tokens of `split` as a read-only memmap (an empty array for an empty split)."""
        return self._open(split, "bin", self.dtype, self.num_tokens(split))

    def doc_offsets(self, split: str) -> np.ndarray:
        """Token offsets of the documents: document i is split(split)[offsets[i]:offsets[i+1]] (checked once:
        they start at 0, never decrease and end at the split's token count)."""
        key = f"{split}.idx"
        fresh = key not in self._cache
        offsets = self._open(split, "idx", INDEX_DTYPE, self.num_documents(split) + 1)
        if fresh and (int(offsets[0]) != 0 or int(offsets[-1]) != self.num_tokens(split)
                      or bool((np.diff(offsets.astype(np.int64)) < 0).any())):
            del self._cache[key]
            raise Lm2Error(f"{self.dir / key} is corrupt (document offsets must run from 0 to "
                           f"{self.num_tokens(split):,} without decreasing); rebuild with "
                           f"`lm2 tokenize RECIPE --force`")
        return offsets

    def document(self, split: str, i: int) -> np.ndarray:
        offsets = self.doc_offsets(split)
        return self.split(split)[int(offsets[i]):int(offsets[i + 1])]

    def tokenizer(self):
        """The tokenizer stored with the shards, checked against meta.json's checksum."""
        from lm2cli.data.tokenizer import Tokenizer

        tok = Tokenizer.load(self.dir / "tokenizer.model")
        if tok.sha256 != self.meta["tokenizer_sha256"]:
            raise Lm2Error(f"{self.dir / 'tokenizer.model'} does not match meta.json (checksum differs); "
                           f"rebuild with `lm2 tokenize RECIPE --force`")
        if tok.vocab_size != self.vocab_size:
            raise Lm2Error(f"{self.dir / 'meta.json'}: vocab_size = {self.vocab_size} but tokenizer.model has "
                           f"{tok.vocab_size} pieces; rebuild with `lm2 tokenize RECIPE --force`")
        return tok

    def check_ids(self, split: str, rows: np.ndarray, starts: np.ndarray) -> None:
        """Refuse token ids at or above the vocabulary in `rows` (windows of `split` starting at `starts`): an
        id the embedding has no row for, from a damaged or mismatched shard."""
        too_big = rows >= self.vocab_size
        if too_big.any():
            r, c = (int(i) for i in np.argwhere(too_big)[0])
            raise Lm2Error(f"{self.dir / (split + '.bin')}: token id {int(rows[r, c])} at token {int(starts[r]) + c:,} "
                           f"is not below the vocabulary size {self.vocab_size} of meta.json; the shard is damaged or "
                           f"was written with another tokenizer; rebuild with `lm2 tokenize RECIPE --force`")

    def _split_meta(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return self.meta["splits"][split]

    def _open(self, split: str, kind: str, dtype: np.dtype, count: int) -> np.ndarray:
        key = f"{split}.{kind}"
        if key not in self._cache:
            path = self.dir / key
            expected = count * dtype.itemsize
            actual = path.stat().st_size if path.is_file() else -1
            if actual != expected:
                state = "missing" if actual < 0 else f"{actual} bytes, expected {expected}"
                raise Lm2Error(f"{path} is incomplete or corrupt ({state}); rebuild with "
                               f"`lm2 tokenize RECIPE --force`")
            if count == 0:
                empty = np.empty(0, dtype)
                empty.flags.writeable = False
                self._cache[key] = empty
            else:
                self._cache[key] = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
        return self._cache[key]

    # ------------------------------------------------------------------------------------------ checks

    def check_matches(self, recipe) -> None:
        """Raise Lm2Error unless these shards were built from `recipe`'s [data] and [tokenizer] sections
        (and unchanged sources) and fit `model.vocab_size` (when that is non-zero)."""
        from lm2cli.data.fingerprint import describe_changes, fingerprint_inputs, fingerprint_of

        inputs = fingerprint_inputs(recipe)
        if fingerprint_of(inputs) != self.meta.get("fingerprint"):
            changed = describe_changes(self.meta.get("fingerprint_inputs", {}), inputs)
            raise Lm2Error(f"token shards in {self.dir} are stale for this recipe ({changed} changed); "
                           f"run `lm2 tokenize RECIPE` first")
        want = recipe.model.vocab_size
        if want and want != self.vocab_size:
            raise Lm2Error(f"model.vocab_size = {want} but the shards in {self.dir} use a vocabulary of "
                           f"{self.vocab_size}; set model.vocab_size = 0 (take it from the tokenizer) or "
                           f"{self.vocab_size}")
        for split in SPLITS:  # size checks: catches truncated copies before training starts
            self.split(split)
            self.doc_offsets(split)
