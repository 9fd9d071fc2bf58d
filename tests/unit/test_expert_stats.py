"""Expert usage and unevenness (paper Table 2) against hand-computed values."""

import math

import pytest
import torch

from peer_dist.config import PEERConfig
from peer_dist.model.peer import PEER
from peer_dist.train.expert_stats import ExpertStats, expert_unevenness, expert_usage


def test_uniform_mass_is_fully_used_and_even():
    mass = torch.full((16,), 3.0, dtype=torch.float64)
    assert expert_usage(mass) == 1.0
    assert expert_unevenness(mass) == pytest.approx(0.0, abs=1e-12)


def test_all_mass_on_one_expert_gives_log_n():
    mass = torch.zeros(1024, dtype=torch.float64)
    mass[17] = 2.5
    assert expert_usage(mass) == 1 / 1024
    assert expert_unevenness(mass) == pytest.approx(math.log(1024), abs=1e-12)


def test_worked_example_by_hand():
    # N = 4 experts, T = 2 tokens, S = 2 selections each.
    stats = ExpertStats(4)
    ids = torch.tensor([[0, 1], [1, 2]])
    gates = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    stats.add(ids, gates)
    # z' = [0.5, 0.5 + 0.25, 0.75, 0] ; ||z'||_1 = 2 ; z = [1/4, 3/8, 3/8, 0]
    assert stats.counts.tolist() == [0.5, 0.75, 0.75, 0.0]
    assert stats.usage() == 0.75
    expected = math.log(4) + 0.25 * math.log(0.25) + 2 * 0.375 * math.log(0.375)
    assert stats.unevenness() == pytest.approx(expected, abs=1e-12)
    assert stats.unevenness() == pytest.approx(0.304098, abs=1e-6)  # the same, by calculator
    assert stats.tokens == 2


def test_same_expert_twice_in_one_token_sums_its_gates():
    stats = ExpertStats(2)
    stats.add(torch.tensor([[1, 1]]), torch.tensor([[0.3, 0.7]]))
    assert stats.counts.tolist() == [0.0, 1.0]
    assert stats.usage() == 0.5
    assert stats.unevenness() == pytest.approx(math.log(2))


def test_counts_summed_over_ranks_equal_one_process():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (40, 6))
    gates = torch.rand(40, 6)
    whole, a, b = ExpertStats(64), ExpertStats(64), ExpertStats(64)
    whole.add(ids, gates)
    a.add(ids[:25], gates[:25])
    b.add(ids[25:], gates[25:])
    a.counts += b.counts  # what all_reduce(SUM) of `counts` does across two ranks
    assert torch.allclose(a.counts, whole.counts, rtol=0, atol=1e-12)
    assert a.unevenness() == pytest.approx(whole.unevenness(), abs=1e-12)
    a.reset()
    assert a.counts.sum() == 0 and a.tokens == 0


def test_bad_inputs_fail_clearly():
    stats = ExpertStats(4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        stats.add(torch.tensor([[4]]), torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="same"):
        stats.add(torch.tensor([[0, 1]]), torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="all zero"):
        stats.usage()
    with pytest.raises(ValueError, match="num_experts"):
        ExpertStats(0)


def test_recorded_routing_of_a_peer_layer():
    torch.manual_seed(0)
    cfg = PEERConfig(num_experts=64, heads=2, topk=4, d_key=8)
    layer = PEER(16, cfg, seed=0, table_device="cpu").eval()
    layer.record_routing = True
    with torch.no_grad():
        layer(torch.randn(3, 10, 16))
    ids, gates = layer.last_routing
    stats = ExpertStats(64)
    stats.add(ids, gates)
    # Softmax per head: every token puts mass 1 per head, so ||z'||_1 = tokens * heads.
    assert stats.counts.sum().item() == pytest.approx(30 * 2, rel=1e-6)
    assert stats.tokens == 30
    used = torch.unique(ids).numel()
    assert stats.usage() == used / 64
    assert 0.0 < stats.unevenness() < math.log(64)
