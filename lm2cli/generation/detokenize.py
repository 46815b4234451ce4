"""Incremental SentencePiece decoding for streaming.

SentencePiece cannot decode one token at a time: a piece like "▁to" means " to" in the middle of a text but
"to" at its start, and byte-fallback pieces (<0xE6>, <0x9D>, <0xB1>) only form a character together. So each
step decodes a short window — a few tokens already printed plus the new ones — and emits the part of the
decoded text that goes beyond the window's already printed part. Text ending in U+FFFD (the replacement
character of an incomplete UTF-8 sequence) is held back until the character is complete. The cost per token
is constant (litgpt re-decodes the whole sequence every step, which is quadratic), and the concatenated
output equals a full decode — a property the tests check on random token sequences.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turn a stream of token ids into a stream of text chunks.

    `decode` is any ids -> str function (the tokenizer's). `context` are ids that precede the stream (the
    prompt); they are never emitted but give the first new tokens their correct leading space.
    """

    def __init__(self, decode, context: list[int] | tuple[int, ...] = (), window: int = 4):
        self.decode = decode
        self.window = window
        self.ids: list[int] = list(context)
        self.printed = len(self.ids)  # ids[:printed] are context or already emitted as text
        self._trim()

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        self.ids.append(token_id)
        before = self._printed_text
        after = self.decode(self.ids)
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""  # an incomplete character, or a token that adds no text (yet)
        self.printed = len(self.ids)
        self._trim()
        return after[len(before):]

    def flush(self) -> str:
        """Emit whatever is still held back (e.g. the stream ended inside a multi-byte character)."""
        before = self._printed_text
        after = self.decode(self.ids)
        self.printed = len(self.ids)
        self._trim()
        return after[len(before):]

    def _trim(self) -> None:
        """Forget printed ids older than the window, so each step costs the same however long the stream.

        The kept window must decode to some text: SentencePiece drops the leading "▁" of the first piece
        that produces text, so a window of only control tokens (or a lone "▁") would swallow the space of
        the next word. Then the window is widened instead.
        """
        drop = max(0, self.printed - self.window)
        text = self.decode(self.ids[drop:self.printed])
        while drop > 0 and not text:
            drop -= 1
            text = self.decode(self.ids[drop:self.printed])
        del self.ids[:drop]
        self.printed -= drop
        self._printed_text = text  # decode(ids[:printed]): what the next push compares against
