"""Row layout over the token shard and the pure-function data order."""

from __future__ import annotations

import numpy as np
import pytest

from lm2cli.training.cursor import RowOrder, plan_windows, rows_for, spread_indices


def docs_of(lengths):
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return starts.astype(np.int64), int(sum(lengths))


def test_short_documents_start_rows_at_their_bos():
    starts, n = docs_of([30] * 40)  # documents shorter than a row
    plan = plan_windows(n, starts, seq_len=64)
    assert plan.bos_aligned == 1.0
    assert set(plan.starts.tolist()) <= set(starts.tolist())
    assert plan.cropped_docs <= 2 / 40  # each document is whole in some row, except the unused tail's
    assert all(s + 65 <= n for s in plan.starts)


def test_rows_cover_every_token_without_gaps():
    rng = np.random.default_rng(0)
    starts, n = docs_of(rng.integers(5, 300, size=200))
    plan = plan_windows(n, starts, seq_len=100)
    s = plan.starts
    assert np.all(np.diff(s) > 0) and np.all(np.diff(s) <= 100)  # next row starts no later than the last one ends
    assert s[-1] + plan.row_len + 100 > n  # and the tiling goes to the end
    assert 0 < plan.bos_aligned <= 1 and 0 <= plan.repeated < 0.5
    assert plan.unused_tokens == n - (s[-1] + plan.row_len)


def test_long_documents_are_split_contiguously():
    starts, n = docs_of([1000])
    plan = plan_windows(n, starts, seq_len=100)
    assert plan.starts.tolist() == list(range(0, 900, 100))
    assert plan.cropped_docs == 1.0 and plan.repeated == 0.0


def test_too_short_shard_gives_no_rows():
    starts, n = docs_of([10])
    assert len(plan_windows(n, starts, seq_len=64)) == 0


def test_order_is_a_permutation_per_epoch_and_reproducible():
    order = RowOrder(10, seed=5)
    epoch0, epoch1 = order.rows(0, 10), order.rows(10, 10)
    assert sorted(epoch0.tolist()) == list(range(10)) == sorted(epoch1.tolist())
    assert epoch0.tolist() != epoch1.tolist()
    assert RowOrder(10, seed=5).rows(7, 6).tolist() == np.concatenate([epoch0[7:], epoch1[:3]]).tolist()
    assert RowOrder(10, seed=6).rows(0, 10).tolist() != epoch0.tolist()
    assert order.epoch_of(25) == 2


def test_order_depends_only_on_the_row_number():
    a, b = RowOrder(37, seed=(1, 2)), RowOrder(37, seed=(1, 2))
    late = b.rows(100, 5)  # b never saw rows 0..99: a resumed run
    assert a.rows(0, 105)[100:].tolist() == late.tolist()


@pytest.mark.parametrize("accum", [1, 3])
def test_ranks_and_micro_batches_partition_the_same_rows(accum):
    first = 1000
    one = {rows_for(first, m, 0, 1, 8) + i for m in range(accum) for i in range(8)}
    two = {rows_for(first, m, r, 2, 4) + i for m in range(accum) for r in range(2) for i in range(4)}
    assert one == {first + i for i in range(8 * accum)}
    assert two == {first + i for i in range(8 * accum)}


def test_spread_indices():
    assert spread_indices(5, 10).tolist() == [0, 1, 2, 3, 4]
    idx = spread_indices(100, 4)
    assert idx[0] == 0 and idx[-1] == 99 and len(set(idx.tolist())) == 4
