"""How calibration batches are shared out over processes (`distributed.share_of`): contiguous,
in process order, sizes within one, covering every batch once; every process does all of them
when there are fewer batches than processes."""

import pytest

from any4_jax import distributed


@pytest.mark.parametrize("processes", [1, 2, 3, 5])
def test_shares_cover_every_batch_once_in_order(processes):
    for n in range(0, 23):
        shares = [distributed.share_of(n, q, processes) for q in range(processes)]
        if n < processes:
            assert all(s == range(n) for s in shares)
            continue
        assert [i for s in shares for i in s] == list(range(n))
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_does_everything_and_gathers_nothing():
    assert distributed.share(7) == range(7)
    items = [{"a": (i, 2 * i)} for i in range(3)]
    got = distributed.gather_items(items, 3)
    assert [int(t["a"][1]) for t in got] == [0, 2, 4]
    assert distributed.sum_over_processes({"x": 3}) == {"x": 3}
