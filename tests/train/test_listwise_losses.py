"""Listwise training losses against values computed by hand."""

import math

import pytest
import torch

from minirerank_core.train.listwise_losses import ranknet_loss, soft_ranking_loss


def sp(x):  # softplus: log(1 + e^x)
    return math.log1p(math.exp(x))


def test_ranknet_binary_relevance():
    s = torch.tensor([[2.0, 0.0, 1.0]])
    rel = torch.tensor([[1, 0, 0]])
    # Pairs (0, 1) and (0, 2); loss of a pair = log(1 + exp(-(s_i - s_j))).
    assert float(ranknet_loss(s, rel, weighted=False)) == pytest.approx((sp(-2) + sp(-1)) / 2)
    # Weighted: ranks by relevance 1, 2, 3 (ties by position) → weights 1/(1+2), 1/(1+3).
    assert float(ranknet_loss(s, rel)) == pytest.approx((sp(-2) / 3 + sp(-1) / 4) / 2)


def test_ranknet_graded_relevance_padding_and_batch():
    s = torch.tensor([[0.0, 1.0, 0.5, 9.0]])
    rel = torch.tensor([[2, 1, 0, 5]])
    mask = torch.tensor([[True, True, True, False]])  # the last candidate is padding
    want = (sp(1) / 3 + sp(0.5) / 4 + sp(-0.5) / 5) / 3  # pairs (0,1), (0,2), (1,2)
    assert float(ranknet_loss(s, rel, mask=mask)) == pytest.approx(want)
    assert float(ranknet_loss(s, rel)) != pytest.approx(want)  # padding would count otherwise
    # Two rows: the mean runs over every pair of the batch (3 + 1 pairs).
    s2 = torch.tensor([[0.0, 1.0, 0.5], [1.0, 3.0, 0.0]])
    rel2 = torch.tensor([[2, 1, 0], [0, 1, 0]])
    want2 = (sp(1) + sp(0.5) + sp(-0.5) + sp(-2) + sp(-3)) / 5  # row 2: (1,0), (1,2)
    assert float(ranknet_loss(s2, rel2, weighted=False)) == pytest.approx(want2)


def test_ranknet_gradient_pushes_the_relevant_page_up():
    s = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    ranknet_loss(s, torch.tensor([[0, 1, 0]])).backward()
    assert s.grad[0, 1] < 0 < s.grad[0, 0] and s.grad[0, 2] > 0
    assert float(ranknet_loss(s.detach(), torch.tensor([[1, 1, 1]]))) == 0.0  # no ordered pair


def test_soft_ranking_puts_ground_truth_first_then_teacher_order():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    lse = math.log(math.e + math.e**2 + 1)
    # Positives [0], teacher [1, 2, 0] → target order 0, 1, 2 with weights 1, 1/2, 1/4 → 4/7, 2/7, 1/7.
    got = float(soft_ranking_loss(s, [[1, 2, 0]], [[0]]))
    assert got == pytest.approx(lse - (4 / 7 * 1 + 2 / 7 * 2 + 1 / 7 * 0))
    # It can fail: the teacher's order alone (1, 2, 0) gives another value.
    assert got != pytest.approx(lse - (4 / 7 * 2 + 2 / 7 * 0 + 1 / 7 * 1))
    assert float(soft_ranking_loss(s, [[1, 2, 0]], [[]])) == pytest.approx(lse - (4 / 7 * 2 + 2 / 7 * 0 + 1 / 7 * 1))
    # Other decay: 0.3 → weights 1, 0.3, 0.09.
    z = 1.39
    assert float(soft_ranking_loss(s, [[1, 2, 0]], [[0]], decay=0.3)) == pytest.approx(lse - (1 / z * 1 + 0.3 / z * 2))


def test_soft_ranking_unnamed_candidates_padding_and_batch():
    s = torch.tensor([[1.0, 2.0, 0.0, 5.0], [0.5, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # Row 0: positives [0], teacher [2] → order 0, 2 (candidate 1 unnamed: target 0); padding outside the softmax.
    row0 = math.log(math.e + math.e**2 + 1) - (2 / 3 * 1 + 1 / 3 * 0)
    # Row 1: two positives [2, 0] first, then the teacher's remaining [3, 1] → weights 1, 1/2, 1/4, 1/8.
    lse1 = math.log(math.exp(0.5) + 1 + math.e + 1)
    row1 = lse1 - (8 / 15 * 1.0 + 4 / 15 * 0.5 + 2 / 15 * 0.0 + 1 / 15 * 0.0)
    got = soft_ranking_loss(s, [[2], [0, 3, 2, 1]], [[0], [2, 0]], mask=mask)
    assert float(got) == pytest.approx((row0 + row1) / 2)
    with pytest.raises(ValueError):
        soft_ranking_loss(s, [[0]], [[0]])
    with pytest.raises(ValueError):
        soft_ranking_loss(s, [[0], [0]], [[0], [0]], decay=1.0)
