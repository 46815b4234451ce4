"""Which tokens each training row holds, and in which order rows are visited: pure functions, no iterator.

Pretraining rows are windows of `seq_len + 1` tokens over the flat train shard. `plan_windows` lays them out
once, deterministically, preferring to start every row at a document start (BOS): when a document is cut
by the end of a row, the next row starts again at that document's BOS (if it began in the second half of
the row), so short documents are seen whole at least once and memory gets to read them from the start.
Documents longer than that are split into contiguous rows.

`RowOrder` maps a global row number k (counting every row consumed since the run began) to a window:
epoch = k // n_windows, and a seeded permutation per epoch picks the window. The data cursor is therefore a
single integer; resuming needs nothing but that integer and the seed, and epochs roll over by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class WindowPlan:
    starts: np.ndarray  # int64 start offset of every row, ascending
    row_len: int  # seq_len + 1 tokens: inputs are row[:-1], targets row[1:]
    n_tokens: int
    bos_aligned: float  # share of rows that start at a document start
    repeated: float  # share of predicted tokens that are predicted by more than one row (overlap cost)
    cropped_docs: float  # share of documents that no row holds whole
    unused_tokens: int  # tokens after the last full row (never trained on)

    def __len__(self) -> int:
        return len(self.starts)

    def describe(self) -> str:
        return (f"{len(self.starts):,} rows of {self.row_len - 1} tokens, {self.bos_aligned:.1%} start at a document "
                f"start; documents cropped (never whole in one row): {self.cropped_docs:.1%}; "
                f"overlap {self.repeated:.1%}; {self.unused_tokens:,} tail tokens unused")


def plan_windows(n_tokens: int, doc_starts: np.ndarray, seq_len: int) -> WindowPlan:
    """Lay rows of `seq_len + 1` tokens over a shard of `n_tokens` tokens with documents at `doc_starts`."""
    row_len = seq_len + 1
    doc_starts = np.asarray(doc_starts, dtype=np.int64)
    if n_tokens < row_len:
        return WindowPlan(np.zeros(0, np.int64), row_len, n_tokens, 0.0, 0.0, 1.0, n_tokens)
    starts = []
    pos = int(doc_starts[0]) if len(doc_starts) and doc_starts[0] + row_len <= n_tokens else 0
    while pos + row_len <= n_tokens:
        starts.append(pos)
        # Contiguous tiling would continue at pos + seq_len (the last token becomes the next first input).
        # Instead restart at the BOS of the document cut at the end, if it began in the row's second half.
        lo, hi = pos + seq_len // 2 + 1, pos + seq_len
        i = np.searchsorted(doc_starts, hi, side="right") - 1
        pos = int(doc_starts[i]) if i >= 0 and doc_starts[i] >= lo else hi
    starts_arr = np.asarray(starts, dtype=np.int64)
    return WindowPlan(starts_arr, row_len, n_tokens, *_stats(starts_arr, row_len, n_tokens, doc_starts))


def _stats(starts: np.ndarray, row_len: int, n_tokens: int, doc_starts: np.ndarray) -> tuple:
    bos_aligned = float(np.isin(starts, doc_starts, assume_unique=True).mean()) if len(starts) else 0.0
    predicted = len(starts) * (row_len - 1)
    covered_until = starts[-1] + row_len if len(starts) else 0
    distinct = covered_until - (starts[0] + 1) if len(starts) else 0
    repeated = 1.0 - distinct / predicted if predicted else 0.0
    # A document [a, b) is whole in a row iff some row start s satisfies s <= a and b <= s + row_len,
    # i.e. the last row starting at or before a reaches b.
    ends = np.append(doc_starts[1:], n_tokens)
    idx = np.searchsorted(starts, doc_starts, side="right") - 1
    whole = (idx >= 0) & (ends <= np.where(idx >= 0, starts[np.maximum(idx, 0)] + row_len, -1))
    cropped = float((~whole).mean()) if len(doc_starts) else 0.0
    return bos_aligned, max(0.0, repeated), cropped, int(n_tokens - covered_until)


class RowOrder:
    """Global row number -> row id: a seeded permutation per epoch (pure function of seed, epoch, index)."""

    def __init__(self, n_rows: int, seed: int | tuple[int, ...]):
        if n_rows <= 0:
            raise ValueError("no rows to order")
        self.n_rows = n_rows
        self.seed = tuple(seed) if isinstance(seed, tuple) else (seed,)
        self._epoch, self._perm = -1, np.zeros(0, np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # cache one epoch: consecutive steps almost always share it
            self._epoch = epoch
            self._perm = np.random.default_rng([*self.seed, epoch]).permutation(self.n_rows)
        return self._perm

    def epoch_of(self, k: int) -> int:
        return k // self.n_rows

    def rows(self, first: int, count: int) -> np.ndarray:
        """Row ids for global row numbers first .. first+count-1 (may cross an epoch boundary)."""
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            k = first + j
            out[j] = self.permutation(k // self.n_rows)[k % self.n_rows]
        return out


def rows_for(step_first_row: int, micro: int, rank: int, world: int, batch_size: int) -> int:
    """Global row number of the first row of micro-batch `micro` on `rank` within one optimizer step.

    The step consumes rows [step_first_row, step_first_row + grad_accum * world * batch_size); every split into
    micro-batches and ranks covers the same set, so one process at batch 2B sees the same rows per step as
    two processes at batch B.
    """
    return step_first_row + (micro * world + rank) * batch_size


def spread_indices(n_available: int, n_wanted: int) -> np.ndarray:
    """`n_wanted` indices spread evenly over range(n_available) (all of them if there are fewer)."""
    if n_wanted >= n_available:
        return np.arange(n_available)
    return np.linspace(0, n_available - 1, n_wanted).round().astype(np.int64)
