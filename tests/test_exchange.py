"""StaleExchange on real gloo process groups: values, staleness, coalescing, bytes."""

import pytest
import torch
import torch.distributed as dist

from comms import CommStats, StaleExchange
from multiproc import run_ranks


def _uneven_all_gather(rank, world):
    stats = CommStats()
    ex = StaleExchange(dist.group.WORLD, range(world), rank, stats)
    shapes = [torch.Size((2, r + 1, 3)) for r in range(world)]  # uneven first dims
    mine = torch.full(tuple(shapes[rank]), float(rank))
    parts = ex.all_gather("x", mine, shapes, sync=True)
    return [p.tolist() for p in parts], stats.totals().as_dict()


def test_uneven_all_gather_returns_unpadded_parts_and_counts_payload_bytes():
    world = 3
    for rank, (parts, totals) in enumerate(run_ranks(_uneven_all_gather, world)):
        for j, p in enumerate(parts):
            assert torch.tensor(p).shape == (2, j + 1, 3)
            assert torch.all(torch.tensor(p) == j)
        mine = 2 * (rank + 1) * 3 * 4
        others = sum(2 * (j + 1) * 3 * 4 for j in range(world) if j != rank)
        assert totals["bytes_sent"] == mine * (world - 1)
        assert totals["bytes_received"] == others
        assert totals["collectives"] == 1


def _stale_sequence(rank, world, coalesce):
    stats = CommStats()
    ex = StaleExchange(dist.group.WORLD, range(world), rank, stats)
    shapes = [torch.Size((4,))] * world
    seen = []
    for step in range(4):
        stats.step = step
        fresh = torch.full((4,), 10.0 * step + rank)
        parts = ex.all_gather("s", fresh, shapes, sync=step == 0, coalesce=coalesce)
        seen.append([p[0].item() for p in parts])
        ex.flush()
    ex.reset()
    return seen


def test_stale_steps_read_what_peers_posted_one_step_earlier():
    for coalesce in (False, True):
        for rank, seen in enumerate(run_ranks(_stale_sequence, 2, coalesce)):
            assert seen[0] == [0.0, 1.0]  # sync: fresh
            assert seen[1] == [0.0, 1.0]  # stale: step 0's values
            assert seen[2] == [10.0, 11.0]
            assert seen[3] == [20.0, 21.0]


def _neighbours(rank, world):
    stats = CommStats()
    ex = StaleExchange(dist.group.WORLD, range(world), rank, stats)
    x = torch.arange(6.0).view(1, 1, 6, 1) + 100 * rank
    first, last = rank == 0, rank == world - 1
    got = ex.neighbours(
        "halo", x,
        to_prev=None if first else x[:, :, :1],
        to_next=None if last else x[:, :, -2:],
        from_prev_shape=None if first else torch.Size((1, 1, 2, 1)),
        from_next_shape=None if last else torch.Size((1, 1, 1, 1)),
        sync=True,
    )
    return [None if t is None else t.flatten().tolist() for t in got], stats.totals().as_dict()


def test_neighbour_exchange_sends_only_boundary_rows():
    results = run_ranks(_neighbours, 3)
    (p0, n0), s0 = results[0]
    (p1, n1), s1 = results[1]
    (p2, n2), _ = results[2]
    assert p0 is None and n0 == [100.0]
    assert p1 == [4.0, 5.0] and n1 == [200.0]
    assert p2 == [104.0, 105.0] and n2 is None
    assert s1["bytes_sent"] == (1 + 2) * 4 and s1["bytes_received"] == (2 + 1) * 4
    assert s0["bytes_sent"] == 2 * 4 and s0["bytes_received"] == 1 * 4



def _mixed_steps(rank, world, bucket_mb, steps=5):
    """Three slots of two dtypes and both wire shapes, one synchronous step, then stale."""
    stats = CommStats()
    ex = StaleExchange(dist.group.WORLD, range(world), rank, stats)
    ex.configure(bucket_mb)
    first, last = rank == 0, rank == world - 1
    seen, pointers = [], []
    for step in range(steps):
        stats.step = step
        sync = step == 0
        kv = torch.full((2, rank + 1, 3), 10.0 * step + rank)  # uneven across members
        parts = ex.all_gather("kv", kv, [torch.Size((2, j + 1, 3)) for j in range(world)], sync=sync, kind="kv")
        halo = torch.full((1, 2), 100.0 * step + rank, dtype=torch.bfloat16)
        above, below = ex.neighbours("halo", halo, to_prev=None if first else halo, to_next=None if last else halo,
                                     from_prev_shape=None if first else torch.Size((1, 2)),
                                     from_next_shape=None if last else torch.Size((1, 2)), sync=sync, kind="halo")
        # a stale view is valid until the exchange's next call: read it now, as layers do
        above, below = (None if t is None else t[0, 0].item() for t in (above, below))
        stats_in = torch.full((4,), step + rank / 10)
        gn = ex.all_gather("gn", stats_in, [stats_in.shape] * world, sync=sync, coalesce=True, kind="gn", stacked=True)
        seen.append(([p[0, 0, 0].item() for p in parts], above, below, gn[:, 0].tolist()))
        pointers.append(parts[0].data_ptr())
        ex.flush()
    ex.reset()
    return seen, [s["collectives"] for s in stats.per_step()], pointers, [s["bytes_sent"] for s in stats.per_step()]


def test_bucketed_steps_equal_slot_by_slot_with_few_operations_on_static_buffers():
    world = 3
    slot_by_slot = run_ranks(_mixed_steps, world, 0)
    bucketed = run_ranks(_mixed_steps, world, 100.0)  # one phase: one all-gather + one neighbour batch
    for rank in range(world):
        seen, ops, pointers, sent = bucketed[rank]
        assert seen == slot_by_slot[rank][0]
        for step in range(1, 5):  # stale: what every member posted one step earlier
            assert seen[step][0] == [10.0 * (step - 1) + j for j in range(world)]
            assert seen[step][3] == pytest.approx([step - 1 + j / 10 for j in range(world)])
        assert slot_by_slot[rank][1][2:] == [3, 3, 3]  # slot by slot: one operation per post
        assert ops[1] == 3 and ops[2:] == [2, 2, 2]  # the first stale step records, then two buckets
        assert pointers[3] == pointers[4]  # the same receive buffer every bucketed step
        assert sent == slot_by_slot[rank][3]  # payload bytes unchanged by the buckets


def _reordered(rank, world):
    stats = CommStats()
    ex = StaleExchange(dist.group.WORLD, range(world), rank, stats)
    names = ["a", "b"]
    for step in range(3):
        stats.step = step
        for name in (reversed(names) if step == 2 else names):
            ex.all_gather(name, torch.ones(2), [torch.Size((2,))] * world, sync=step == 0)
        ex.flush()
    return "no error"


def test_a_changed_call_order_inside_a_request_is_a_clear_error():
    with pytest.raises(Exception, match="recorded sequence"):
        run_ranks(_reordered, 2)
