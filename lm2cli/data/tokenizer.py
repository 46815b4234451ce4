"""The one tokenizer wrapper: SentencePiece, trained by `lm2 tokenize` or reused from a `.model` file.

Training, generation, evaluation and the BABILong builder all go through `Tokenizer`, so special ids and
text handling cannot drift between them. A tokenizer trained by lm2 has fixed special ids:

    <unk> 0, <s> (BOS) 1, </s> (EOS) 2, <pad> 3, tokenizer.answer_token 4, tokenizer.extra_symbols..., "\\n"

Text is not normalised (SentencePiece's "identity" rule, extra whitespace kept) and the newline is a
reserved piece of its own, so `decode(encode(text)) == text` for any text (byte fallback covers characters
outside the vocabulary). The one exception is leading whitespace: SentencePiece's dummy prefix makes
`encode("a")` and `encode(" a")` differ by one "▁" piece, and `decode` drops one leading space.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from lm2cli.errors import Lm2Error

UNK_ID, BOS_ID, EOS_ID, PAD_ID, ANSWER_ID = 0, 1, 2, 3, 4
NEWLINE = "\n"
# SentencePiece skips training sentences longer than this many bytes; we cut longer lines below it.
MAX_TRAIN_SENTENCE_BYTES = 4096

# Piece types in sentencepiece_model.proto (SentencePiece.Type).
_USER_DEFINED = 4


def _import_spm():
    import sentencepiece as spm

    return spm


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(msg: bytes):
    """Yield (field number, value) of a serialized protobuf message: ints for varints, bytes for
    length-delimited fields; fixed-width fields are skipped."""
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(msg, pos)
            yield field, value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(msg, pos)
            yield field, msg[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")


def user_defined_pieces(model_proto: bytes) -> list[int]:
    """Ids of the user-defined pieces of a serialized SentencePiece ModelProto, in id order.

    The sentencepiece Python package exposes no "is user defined" query and its proto module needs
    protobuf (not an lm2 dependency), so we read the two fields we need by hand: ModelProto.pieces (field 1,
    repeated message) and SentencePiece.type (field 3, varint).
    """
    pieces = [value for field, value in _proto_fields(model_proto) if field == 1 and isinstance(value, bytes)]
    return [i for i, piece in enumerate(pieces) if _piece_type(piece) == _USER_DEFINED]


def _piece_type(msg: bytes) -> int:
    types = [value for field, value in _proto_fields(msg) if field == 3 and isinstance(value, int)]
    return types[-1] if types else 1  # NORMAL is the proto default


class Tokenizer:
    """A SentencePiece model plus lm2's special ids. Build with `load`, `from_bytes` or `train`."""

    def __init__(self, model_bytes: bytes, where: str = "tokenizer", answer_token: str | None = None):
        spm = _import_spm()
        self._bytes = bytes(model_bytes)
        self.where = where
        # One thread: lm2 parallelises with processes (lm2cli.data.prepare), never with hidden thread pools.
        self.sp = spm.SentencePieceProcessor(num_threads=1)
        try:
            self.sp.LoadFromSerializedProto(self._bytes)
        except (RuntimeError, OSError) as e:
            raise Lm2Error(f"{where}: not a SentencePiece model ({str(e).splitlines()[0][:120]})") from None
        self.sha256 = hashlib.sha256(self._bytes).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise Lm2Error(f"{where}: the SentencePiece model has no BOS/EOS pieces; lm2 needs both "
                           f"(train one with `lm2 tokenize`)")
        # A foreign model without <pad> pads with EOS: padded positions are masked out of every loss anyway.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.unk_id = self.sp.unk_id()
        self._answer_id = self._find_answer_id(answer_token)
        newline = self.sp.piece_to_id(NEWLINE)
        self.newline_id = newline if newline != self.unk_id else None

    def _find_answer_id(self, answer_token: str | None) -> int | None:
        if answer_token is not None:
            found = self.sp.piece_to_id(answer_token)
            return found if found != self.unk_id else None
        # lm2 tokenizers reserve the answer separator as their first user-defined piece (id 4).
        user = user_defined_pieces(self._bytes)
        return user[0] if user and self.sp.id_to_piece(user[0]) != NEWLINE else None

    # ----------------------------------------------------------------------------------------- building

    @classmethod
    def load(cls, path: str | Path, answer_token: str | None = None) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise Lm2Error(f"tokenizer file not found: {path}")
        return cls(path.read_bytes(), where=str(path), answer_token=answer_token)

    @classmethod
    def from_bytes(cls, model_bytes: bytes, answer_token: str | None = None) -> Tokenizer:
        return cls(model_bytes, answer_token=answer_token)

    def to_bytes(self) -> bytes:
        return self._bytes

    def save(self, path: str | Path) -> None:
        from lm2cli.fileio import atomic_write_bytes

        atomic_write_bytes(path, self._bytes)

    # ------------------------------------------------------------------------------------------ use

    @property
    def answer_id(self) -> int:
        if self._answer_id is None:
            raise Lm2Error(f"{self.where}: this tokenizer has no answer separator piece; train one with "
                           f"`lm2 tokenize` or set tokenizer.answer_token to a piece it contains")
        return self._answer_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = self.sp.encode(list(texts))
        if bos or eos:
            out = [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]
        return out

    def encode_numpy(self, texts: list[str]) -> list:
        """int32 numpy arrays of token ids (no BOS/EOS), the fast path used to write shards."""
        return self.sp.encode(list(texts), return_type="numpy", num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control pieces (BOS, EOS, PAD) are dropped, byte pieces are reassembled."""
        return self.sp.decode([int(i) for i in ids])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's character span in `text` (a piece that starts a word includes the
        space before it; the byte pieces of one character share that character's span, some of them empty)."""
        return _ids_and_spans(self.sp.encode(text, out_type="serialized_proto"), text)

    def decode_with_offsets(self, ids: Iterable[int]) -> tuple[str, list[tuple[int, int]]]:
        """`decode(ids)` and each id's character span in that text (control pieces get empty spans)."""
        proto = self.sp.decode([int(i) for i in ids], out_type="serialized_proto")
        text = next((v for f, v in _proto_fields(proto) if f == 1), b"").decode("utf-8")
        return text, _ids_and_spans(proto, text)[1]

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def token_byte_lengths(self):
        """UTF-8 bytes each token id contributes to decoded text (an int64 numpy array over the vocabulary):
        control pieces (BOS, EOS, PAD) 0, byte-fallback pieces 1, others the length of the piece with
        SentencePiece's "▁" read as one space.

        Summed over a text's tokens this is the byte length of the decoded text (SentencePiece drops the leading
        space of a decoded sequence; we count it), so bits per byte compare across tokenizers.
        """
        import numpy as np

        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_control(i):
                continue
            lengths[i] = 1 if self.sp.is_byte(i) else len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.where}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def _ids_and_spans(proto: bytes, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character spans from a serialized SentencePieceText: pieces are field 2, each with id (2),
    begin (4) and end (5) as UTF-8 byte offsets into `text` (absent fields are 0)."""
    char_of_byte = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))] + [len(text)]
    ids, spans = [], []
    for field_no, piece in _proto_fields(proto):
        if field_no != 2:
            continue
        values = dict(_proto_fields(piece))
        ids.append(values.get(2, 0))
        spans.append((char_of_byte[values.get(4, 0)], char_of_byte[values.get(5, 0)]))
    return ids, spans


# --------------------------------------------------------------------------------------------- training


def training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Lines of the documents, cut below SentencePiece's sentence limit (longer ones would be skipped)."""
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            while len(line.encode("utf-8")) > MAX_TRAIN_SENTENCE_BYTES:
                cut = line.rfind(" ", 0, MAX_TRAIN_SENTENCE_BYTES // 4)  # a char is at most 4 bytes
                cut = cut if cut > 0 else MAX_TRAIN_SENTENCE_BYTES // 4
                yield line[:cut]
                line = line[cut:].lstrip()
            if line:
                yield line


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_tokenizer(sentences: Iterable[str], *, model_type: str, vocab_size: int, byte_fallback: bool,
                    character_coverage: float, sample_sentences: int, answer_token: str,
                    extra_symbols: list[str], seed: int) -> Tokenizer:
    """Train a SentencePiece model on `sentences` with lm2's fixed special ids (see the module docstring).

    One training thread: SentencePiece's result depends on its thread count, and the same recipe must give
    the same tokenizer on every machine and for any `data.workers`.

    Errors SentencePiece reports about the vocabulary size become one line naming `tokenizer.vocab_size`.
    """
    spm = _import_spm()
    symbols = [answer_token, *extra_symbols, NEWLINE]
    for sym in [answer_token, *extra_symbols]:
        if not sym or "," in sym or any(c.isspace() for c in sym):
            raise Lm2Error(f"tokenizer symbol {sym!r} (tokenizer.answer_token / tokenizer.extra_symbols) must be "
                           f"non-empty, without spaces or commas, e.g. '<sep>'")
    if len(set(symbols)) != len(symbols):
        raise Lm2Error(f"tokenizer.extra_symbols {extra_symbols} repeat a reserved piece "
                       f"({answer_token!r} or the newline)")
    spm.set_random_generator_seed(seed)  # the sentence sample must not change between runs
    model = io.BytesIO()
    n_seen = 0

    def counted() -> Iterator[str]:
        nonlocal n_seen
        for s in sentences:
            n_seen += 1
            yield s

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(), model_writer=model, model_type=model_type, vocab_size=vocab_size,
            byte_fallback=byte_fallback, character_coverage=character_coverage,
            input_sentence_size=sample_sentences, shuffle_input_sentence=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, user_defined_symbols=symbols,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            max_sentence_length=MAX_TRAIN_SENTENCE_BYTES * 2, num_threads=1,
            minloglevel=2)
    except RuntimeError as e:
        raise _vocab_error(str(e), vocab_size, n_seen) from None
    return Tokenizer(model.getvalue(), where="trained tokenizer")


def _vocab_error(message: str, vocab_size: int, n_sentences: int) -> Lm2Error:
    if m := _TOO_HIGH.search(message):
        return Lm2Error(f"tokenizer.vocab_size = {vocab_size} is larger than this corpus supports "
                        f"(at most {m.group(2)} pieces from {n_sentences} sentences); set tokenizer.vocab_size "
                        f"<= {m.group(2)} or use a larger corpus")
    if m := _TOO_SMALL.search(message):
        return Lm2Error(f"tokenizer.vocab_size = {vocab_size} is too small: the corpus needs {m.group(2)} "
                        f"pieces for its characters, bytes and special symbols; raise tokenizer.vocab_size "
                        f"or lower tokenizer.character_coverage")
    if "0 sentences" in message or n_sentences == 0:
        return Lm2Error("the corpus is empty: no text to train the tokenizer on")
    first = message.splitlines()[0] if message else "unknown error"
    return Lm2Error(f"SentencePiece could not train the tokenizer (tokenizer.vocab_size = {vocab_size}): "
                    f"{first.split('] ', 1)[-1][:200]}")
