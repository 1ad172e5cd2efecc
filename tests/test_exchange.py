"""StaleExchange on real gloo process groups: values, staleness, coalescing, bytes."""

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

