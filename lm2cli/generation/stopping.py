"""Text-level stop strings for streamed output.

Stops are matched against the decoded *text*, not token ids: the same string tokenizes differently in
different contexts, and a stop may end in the middle of a token. While the tail of the pending text could
still be the beginning of a stop string it is held back, so nothing that belongs to a stop is ever printed.
Every call searches the whole pending text again (never a per-token "progress" counter), which avoids the
litgpt bug where the stop [A, B] is missed in the stream A A B.
"""

from __future__ import annotations


class StopMatcher:
    """Feed decoded text chunks in; get back the text that is safe to emit and whether a stop matched."""

    def __init__(self, stops: tuple[str, ...] | list[str] = ()):
        self.stops = tuple(s for s in stops if s)  # an empty stop string would match everywhere
        self.pending = ""   # text received but not yet emitted: it may still turn into a stop string
        self.stopped = False

    def feed(self, chunk: str) -> str:
        """Add `chunk`; return the text that can be emitted now. After a match, `stopped` is True and the
        text is cut just before the earliest stop string; later input is ignored."""
        if self.stopped:
            return ""
        self.pending += chunk
        cut = self._earliest_match()
        if cut is not None:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        held = self._held_back_length()
        out = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        """The generation ended without a stop: whatever was held back is ordinary text after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _earliest_match(self) -> int | None:
        # A stop cannot start inside already emitted text: its beginning would have been held back.
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back_length(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of some stop."""
        text = self.pending
        longest = max((len(s) for s in self.stops), default=1) - 1
        for n in range(min(longest, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
