"""Single-process checks of the parallel layer's pure parts: degrees, id map, cost model."""

from __future__ import annotations

import pytest
import torch

from peer_dist.parallel import IdMap
from peer_dist.parallel.cost import (
    Counts,
    LayerShape,
    block_rows,
    by_link,
    mean_by_link,
    predict_by_link,
    predict_per_token,
)
from peer_dist.parallel.node_dispatch import Routes
from peer_dist.parallel.topology import TopologyError, check_degrees
from peer_dist.tools.bench_dist import paper_rows


def test_degrees_are_checked_early_with_the_allowed_values() -> None:
    assert check_degrees(8, 0) == (8, 1)
    assert check_degrees(8, 2) == (2, 4)
    allowed = r"ep=3 does not divide the world size 8.*\[1, 2, 4, 8\]"
    with pytest.raises(TopologyError, match=allowed):
        check_degrees(8, 3)
    with pytest.raises(TopologyError, match="ep=-1"):
        check_degrees(4, -1)


@pytest.mark.parametrize("n, ep", [(1024, 3), (1024, 4), (65536, 7)])
def test_id_bijection_and_block_layout(n: int, ep: int) -> None:
    m = IdMap(n, ep, balance=True)
    ids = torch.arange(n)
    pos = m.position(ids)
    assert torch.equal(torch.sort(pos).values, ids)  # a bijection
    assert torch.equal(m.expert(pos), ids)
    owner, local = m.split(pos)
    sizes = torch.bincount(owner, minlength=ep).tolist()
    assert sizes == list(block_rows(n, ep))  # torch.chunk layout
    chunks = [t.shape[0] for t in torch.arange(n).chunk(ep)]
    assert sizes == chunks + [0] * (ep - len(chunks))
    assert int(local.max()) < m.block
    # neighbouring ids (one popular first sub-key) spread over owners
    assert len(set(owner[:64].tolist())) == ep


def test_paper_scale_dispatch_moves_10x_fewer_bytes_than_replicated() -> None:
    rows = {r["strategy"]: r for r in paper_rows() if r["world_size"] == 8}
    d = rows["dispatch"]["bytes_per_token_layer_predicted"]
    assert rows["replicated"]["bytes_per_token_layer_predicted"] / d >= 10
    assert rows["fetch"]["bytes_per_token_layer_predicted"] > d  # training batches: dispatch


def test_expected_counts_match_a_simulation() -> None:
    shape = LayerShape(num_experts=4096, dim=8, selections=16, tokens=64, ep=4, world=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (64, 16), generator=g)
    owners = ids // 1024
    touched = sum(len(set(row.tolist())) for row in owners) / 64
    assert abs(touched - shape.owners_touched()) / shape.owners_touched() < 0.05
    pred = predict_per_token(shape)
    assert pred["dispatch"] < pred["fetch"] < pred["replicated"]


def test_node_dispatch_sends_a_token_once_per_remote_node() -> None:
    """2 nodes x 2 ranks, N = 512^2, d = 256: every token reaches every owner, so flat dispatch
    sends x to 2 remote owners and node_dispatch to 1 gateway; the per-selection metadata
    (12 bytes forward, 4 back) crosses either way: (4096 + 1024) / (8192 + 1024) = 0.556."""
    small = predict_by_link(LayerShape(512 ** 2, 256, 128, 1024, 4, 4, ranks_per_node=2))
    assert abs(small["node_dispatch"][1] / small["dispatch"][1] - 5120 / 9216) < 1e-3
    # the bytes it saves across nodes it moves inside them; one node: nothing crosses
    assert small["node_dispatch"][0] > small["dispatch"][0]
    one = predict_by_link(LayerShape(512 ** 2, 256, 128, 1024, 4, 4))
    assert one["dispatch"][1] == one["node_dispatch"][1] == 0.0
    # the paper's layer on 8 nodes x 8 GPUs: at most 1/6 of flat dispatch's inter-node bytes
    paper = predict_by_link(LayerShape(1024 ** 2, 1024, 128, 4096, 64, 64, ranks_per_node=8))
    assert paper["node_dispatch"][1] <= paper["dispatch"][1] / 6
    for k, (intra, inter) in paper.items():  # totals unchanged by the split
        assert intra >= 0 and inter >= 0, k


@pytest.mark.parametrize("nodes", [(0, 0, 1, 1), (0, 0, 0, 1, 1), (5, 5, 5, 7, 7, 9),
                                   (0,) * 8 + (1,) * 8 + (2,) * 3, (0, 1), (3,)])
def test_mean_over_members_in_closed_form_equals_each_member_summed(nodes) -> None:
    """predict_by_link's closed form (mean_by_link, linear in W) against by_link member by
    member (quadratic), on uneven nodes too, with different counts for every destination."""
    w, m = len(nodes), len(set(nodes))
    g = torch.Generator().manual_seed(w)
    draw = [torch.rand(k, generator=g, dtype=torch.float64).mul(100).tolist()
            for k in (w, w, w, m)]
    c, r = Counts(*draw), Routes(nodes, block=10)
    for strategy in ("fetch", "dispatch", "node_dispatch"):
        each = [by_link(strategy, c, me, r, dim=8, elem=4) for me in range(w)]
        mean = mean_by_link(strategy, c, r, dim=8, elem=4)
        for i in (0, 1):
            assert mean[i] == pytest.approx(sum(x[i] for x in each) / w, rel=1e-12, abs=1e-9)
    assert mean_by_link("dispatch", c, r, 8, 4)[1] > 0 or m == 1  # not trivially zero


def test_group_pairs_by_destination_keeps_token_order():
    """dispatch's grouping sorts by destination only: on token-major selections that is the
    (destination, token) order, pairs and metadata included; other input is refused."""
    from peer_dist.parallel.dispatch import group_pairs

    g = torch.Generator().manual_seed(0)
    t, s, w = 37, 6, 5
    dest = torch.randint(0, w, (t * s,), generator=g)
    row = torch.randint(0, 1000, (t * s,), generator=g)
    token = torch.arange(t).repeat_interleave(s)
    got = group_pairs(dest, row, token, t, w)
    _, order = torch.sort(dest * t + token, stable=True)
    assert torch.equal(got.order, order)
    pairs = torch.unique(dest * t + token)
    assert torch.equal(got.pair_token, pairs % t)
    assert torch.equal(got.pair_count, torch.bincount(pairs // t, minlength=w))
    assert torch.equal(got.meta[:, 0], row[order].to(torch.int32))
    with pytest.raises(ValueError, match="nondecreasing"):
        group_pairs(dest, row, token.flip(0), t, w)
