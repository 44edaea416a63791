"""One MaxSim, two kernels: the index's (numpy, unpadded) and training's (torch, padded) agree, unnormalised."""

import numpy as np
import torch

from minirerank_core.retrieval.maxsim import maxsim_padded, maxsim_scores


def test_kernels_agree_on_padded_and_unpadded_pages():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 8, generator=g)
    qmask = torch.ones(3, 6, dtype=torch.bool)
    qmask[1, 4:] = False  # a shorter query
    d = torch.randn(4, 9, 8, generator=g)
    dmask = torch.ones(4, 9, dtype=torch.bool)
    dmask[2, 5:] = False  # a shorter page
    padded = maxsim_padded(q, qmask, d, dmask)
    pages = [d[i, dmask[i]].numpy() for i in range(4)]
    vectors, offsets = np.concatenate(pages), np.concatenate([[0], np.cumsum([len(p) for p in pages])])
    for i in range(3):
        qi = q[i, qmask[i]]
        np.testing.assert_allclose(maxsim_scores(qi.numpy(), vectors, offsets), padded[i].numpy(), rtol=1e-5, atol=1e-5)
        # by hand: sum over query tokens of the best page row, no division by the query length
        want = [float((qi @ torch.from_numpy(p).T).max(-1).values.sum()) for p in pages]
        np.testing.assert_allclose(padded[i].numpy(), want, rtol=1e-5, atol=1e-5)


def test_padded_kernel_is_differentiable():
    q = torch.randn(2, 3, 4, requires_grad=True)
    d = torch.randn(2, 5, 4)
    maxsim_padded(q, torch.ones(2, 3, dtype=torch.bool), d, torch.ones(2, 5, dtype=torch.bool)).sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
