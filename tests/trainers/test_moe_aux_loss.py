"""The auxiliary balance loss (trainers/moe_aux_loss.py): the batch-wise and the sequence-wise forms on worked
examples. ``RouterAuxLoss`` on a real DeepSeek-V3 model is tested with the aux_loss mode in test_moe_balance.py."""

import pytest
import torch

from posttrain.trainers.moe_aux_loss import aux_balance_loss, sequence_aux_balance_loss
from posttrain.trainers.moe_balance import MoEBalanceConfig


def test_aux_balance_loss():
    # uniform normalised affinities: P_i = 1/E, sum_i f_i = E -> loss = alpha whatever the selection
    scores = torch.full((4, 4), 0.5)
    assert aux_balance_loss(scores, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), 4).item() == pytest.approx(1e-3)
    # collapsed routing onto experts 0, 1 that also get the affinity: f = [2, 2, 0, 0], P = [.45, .45, .05, .05]
    scores = torch.tensor([[0.9, 0.9, 0.1, 0.1]] * 4, requires_grad=True)
    loss = aux_balance_loss(scores, torch.tensor([[0, 1]] * 4), 4, alpha=1e-3)
    assert loss.item() == pytest.approx(1.8e-3)
    loss.backward()  # descent lowers the overloaded experts' affinity and raises the others'
    assert (scores.grad[:, :2] > 0).all() and (scores.grad[:, 2:] < 0).all()
    # pads are left out
    mask = torch.tensor([1, 1, 0, 0])
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [0, 1]])
    assert aux_balance_loss(torch.full((4, 4), 0.5), idx, 4, mask=mask).item() == pytest.approx(1e-3)


def test_sequence_aux_balance_loss_worked_example():
    """DeepSeek-V3's sequence-wise balance loss (arXiv 2412.19437 eqs. 17-20) beside the batch-wise one.

    E = 2, K = 1, two sequences of T = 2 tokens, unnormalised (sigmoid-like) affinities:
      seq 0: s = [[.6, .2], [.3, .3]] -> s' = [[.75, .25], [.5, .5]], P = [.625, .375]; picks [0, 1]
             f = E / (K T) * [1, 1] = [1, 1]; L_0 = .625 + .375 = 1.0
      seq 1: s = [[.9, .1], [.4, .4]] -> s' = [[.9, .1], [.5, .5]], P = [.7, .3]; picks [0, 0]
             f = [2, 0]; L_1 = 1.4
      sequence-wise: alpha (1.0 + 1.4) / 2 = 1.2 alpha
      batch-wise (all 4 tokens): P = [2.65, 1.35] / 4, f = 2 / 4 * [3, 1] = [1.5, .5] -> 1.1625 alpha
      with seq 1's second token a pad: L_1 = f [2, 0] . P [.9, .1] = 1.8 -> (1.0 + 1.8) / 2 = 1.4 alpha
    """
    scores = torch.tensor([[[0.6, 0.2], [0.3, 0.3]], [[0.9, 0.1], [0.4, 0.4]]], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[[0], [1]], [[0], [0]]])
    seq = sequence_aux_balance_loss(scores, idx, 2, alpha=0.5)
    assert seq.item() == pytest.approx(0.5 * 1.2, abs=1e-12)
    assert aux_balance_loss(scores.reshape(4, 2), idx.reshape(4, 1), 2, alpha=0.5).item() == pytest.approx(
        0.5 * 1.1625, abs=1e-12
    )
    mask = torch.tensor([[1, 1], [1, 0]])
    assert sequence_aux_balance_loss(scores, idx, 2, alpha=0.5, mask=mask).item() == pytest.approx(0.5 * 1.4, abs=1e-12)
    # gradient through P only (f is a count): d/ds of alpha/B * f_{b,i} * mean_t s'_{t,i}
    seq.backward()
    s = scores.detach()
    f = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    expect = torch.zeros_like(s)
    for b in range(2):
        for t in range(2):
            tot = s[b, t].sum()
            for j in range(2):  # d s'_{t,i} / d s_{t,j} = (delta_ij tot - s_{t,i}) / tot^2
                expect[b, t, j] = sum(0.5 / 2 * f[b, i] / 2 * ((i == j) * tot - s[b, t, i]) / tot**2 for i in range(2))
    torch.testing.assert_close(scores.grad, expect)
    # a fully padded sequence is left out of the mean; all padded: 0
    assert sequence_aux_balance_loss(
        scores.detach(), idx, 2, alpha=0.5, mask=torch.tensor([[1, 1], [0, 0]])
    ).item() == pytest.approx(0.5 * 1.0, abs=1e-12)
    assert sequence_aux_balance_loss(scores.detach(), idx, 2, mask=torch.zeros(2, 2)).item() == 0.0
    # the option names which is which
    assert MoEBalanceConfig().moe_aux_loss_scope == "batch"
    with pytest.raises(ValueError, match="valid: batch, sequence"):
        MoEBalanceConfig(moe_aux_loss_scope="token")
