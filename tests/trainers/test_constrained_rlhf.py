"""Constrained RLHF pure math: worked examples, property tests of the mixing and the multiplier state, and the
Nelder-Mead search of NM-PPO.

The worked examples (a minibatch of 4 token-steps, N = 2 streams: intent, METEOR) were computed with numpy from the
official code's rules (tedmoskovitz/ConstrainedRL4LMs at 11ac8fe01be13e3d795d48c034976e08caa61a67,
``rl4lms/algorithms/constrained_ppo/constrained_ppo.py``: per-stream normalisation with the unbiased std + 1e-8, the
squashed mix (N - sum_i w_i) A_KL + sum_i w_i A_i, the multiplier loss sum_i w_i (R2G_i - theta_i) stepped by
SGD(lr 0.1, momentum 0.1)); the thresholds theta = (0.44, 0.238) are those of its
``scripts/training/task_configs/dialog/gpt2_constrained_ppo.yml``. They are not values from the paper (arXiv
2310.04373).
"""

import io
import math

import numpy as np
import pytest
import torch

from posttrain.trainers.advantages import group_mean_advantages, rloo_advantages
from posttrain.trainers.constrained_rlhf import (
    ConstrainedRLHFConfig,
    LagrangeMultipliers,
    formulation_advantages,
    mix_advantages,
    mix_upper_bound_advantages,
    mixed_rewards,
    multiplier_loss,
    normalise_stream,
    sat_rewards,
    squash_multipliers,
)
from posttrain.trainers.nelder_mead import EarlyStopEvaluation, NelderMead

D = torch.float64

# --- worked example: a minibatch of 4, N = 2 (intent, METEOR) --------------------------------------------
A_C = torch.tensor([[1.0, 0.2], [0.0, -0.4], [-1.0, 0.8], [2.0, 0.0]], dtype=D)
A_KL = torch.tensor([0.1, -0.3, 0.2, 0.0], dtype=D)
THETA = [0.44, 0.238]
R2G = [0.49, 0.208]


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D), rtol=0, atol=atol)


def test_worked_normalised_streams():
    close(normalise_stream(A_C), [[0.387298, 0.1], [-0.387298, -1.1], [-1.161895, 1.3], [1.161895, -0.3]])
    close(normalise_stream(A_KL), [0.46291, -1.38873, 0.92582, 0.0], atol=5e-6)


def test_worked_xi_mix():
    lam = torch.tensor([0.2, -0.1], dtype=D)
    w = squash_multipliers(lam, equality=True)
    close(w, [0.197375, -0.099668])
    close(2 - w.sum(), 1.902293)
    close(mix_advantages(A_C, A_KL, lam, equality=True), [0.947067, -2.608579, 1.402283, 0.259230])


def test_worked_mu_mix():
    lam = torch.zeros(2, dtype=D)
    close(squash_multipliers(lam, equality=False), [0.5, 0.5])
    close(mix_advantages(A_C, A_KL, lam, equality=False), [0.706559, -2.132379, 0.994873, 0.430948])


def test_worked_float32_inputs_give_the_same_numbers():
    out = mix_advantages(A_C.float(), A_KL.float(), torch.tensor([0.2, -0.1]), equality=True)
    assert out.dtype == torch.float32
    close(out.double(), [0.947067, -2.608579, 1.402283, 0.259230], atol=2e-6)


def test_worked_multiplier_gradient_and_two_steps():
    lam = torch.tensor([0.2, -0.1], dtype=D, requires_grad=True)
    multiplier_loss(lam, R2G, THETA, equality=True).backward()
    close(lam.grad, [0.048052, -0.029702])  # sech^2(lambda) * violation, violation = [0.05, -0.03]

    m = LagrangeMultipliers(2, equality=True, lr=0.1, momentum=0.1, grad_clip=0.5, init=[0.2, -0.1])
    m.step(R2G, THETA)
    close(m.lam.detach(), [0.195195, -0.097030])
    m.step(R2G, THETA)  # momentum 0.1 enters from the second step on
    close(m.lam.detach(), [0.189900, -0.093761])


# --- mixing: properties with fresh random inputs -----------------------------------------------------------


@pytest.fixture
def streams():
    g = torch.Generator().manual_seed(1234)
    B, N = 16, 3
    return (
        torch.randn(B, N, generator=g, dtype=D) * 3 + 1,
        torch.randn(B, generator=g, dtype=D) * 0.2 - 4,
        torch.randn(N, generator=g, dtype=D) * 2,
    )


def test_mix_matches_the_formula(streams):
    A_c, A_kl, lam = streams
    A_c_n = (A_c - A_c.mean(0)) / (A_c.std(0) + 1e-8)
    A_kl_n = (A_kl - A_kl.mean()) / (A_kl.std() + 1e-8)
    for equality, w in ((True, torch.tanh(lam)), (False, torch.sigmoid(lam))):
        expected = (3 - w.sum()) * A_kl_n + (A_c_n * w).sum(1)
        close(mix_advantages(A_c, A_kl, lam, equality), expected, atol=1e-10)
    close(mix_advantages(A_c, A_kl, lam, True, squash=False), A_kl_n + (A_c_n * lam).sum(1), atol=1e-10)


@pytest.mark.parametrize("equality", [True, False])
def test_squashed_weights_sum_to_n(streams, equality):
    # every stream equal to the KL stream: the mix is (total weight) * stream = N * stream for any multipliers
    _, A_kl, lam = streams
    same = A_kl[:, None].repeat(1, 3)
    close(mix_advantages(same, A_kl, lam, equality), 3 * normalise_stream(A_kl), atol=1e-10)
    # unsquashed: the total weight is 1 + sum(lambda), not N
    close(mix_advantages(same, A_kl, lam, equality, squash=False), (1 + lam.sum()) * normalise_stream(A_kl), atol=1e-10)


def test_mix_identities(streams):
    A_c, A_kl, _ = streams
    A_c_n, A_kl_n = normalise_stream(A_c), normalise_stream(A_kl)
    zeros = torch.zeros(3, dtype=D)
    close(mix_advantages(A_c, A_kl, zeros, True, squash=False), A_kl_n)  # no constraint weight: the KL stream
    close(mix_advantages(A_c, A_kl, zeros, True), 3 * A_kl_n)  # tanh(0) = 0: all weight on KL
    close(mix_advantages(A_c, A_kl, zeros, False), 1.5 * A_kl_n + 0.5 * A_c_n.sum(1))  # sigmoid(0) = 1/2
    e1 = torch.tensor([0.0, 1.0, 0.0], dtype=D)
    close(mix_advantages(A_c, A_kl, e1, False, squash=False), A_kl_n + A_c_n[:, 1])  # fixed weights pick streams
    close(mix_advantages(A_c, A_kl, torch.full((3,), 50.0, dtype=D), True), A_c_n.sum(1))  # tanh -> 1: KL weight 0


def test_mix_is_scale_and_shift_invariant_per_stream(streams):
    # each stream is normalised, so kl_coef (a positive scale of the KL stream) and reward offsets cancel
    A_c, A_kl, lam = streams
    scaled = A_c * torch.tensor([10.0, 0.1, 3.0], dtype=D) + torch.tensor([5.0, -2.0, 0.0], dtype=D)
    close(
        mix_advantages(scaled, 7 * A_kl - 1, lam, True), mix_advantages(A_c, A_kl, lam, True), atol=1e-6
    )  # up to the eps
    assert not torch.allclose(mix_advantages(A_c, -A_kl, lam, True), mix_advantages(A_c, A_kl, lam, True))


def test_mix_detaches_the_multipliers_and_checks_shapes(streams):
    A_c, A_kl, lam = streams
    lam = lam.clone().requires_grad_(True)
    A_c = A_c.clone().requires_grad_(True)
    mix_advantages(A_c, A_kl, lam, True).sum().backward()
    assert lam.grad is None
    with pytest.raises(ValueError, match="multipliers"):
        mix_advantages(A_c, A_kl, torch.zeros(2), True)
    with pytest.raises(ValueError, match="kl_adv"):
        mix_advantages(A_c, A_kl[:-1], torch.zeros(3), True)
    with pytest.raises(ValueError, match="component_adv"):
        mix_advantages(A_kl, A_kl, torch.zeros(3), True)


def test_upper_bound_mix(streams):
    A_c, A_kl, lam = streams
    mu = torch.sigmoid(lam)
    close(
        mix_upper_bound_advantages(A_c, A_kl, lam),
        normalise_stream(A_kl) + (normalise_stream(A_c) * (1 - mu)).sum(1),
        atol=1e-10,
    )
    # multipliers saturated: components get no weight, only the KL stream is left
    close(mix_upper_bound_advantages(A_c, A_kl, torch.full((3,), 60.0, dtype=D)), normalise_stream(A_kl))


def test_multiplier_loss_signs_and_upper_bound():
    lam = torch.zeros(2, dtype=D, requires_grad=True)
    multiplier_loss(lam, [0.6, 0.1], [0.5, 0.2], equality=False).backward()
    close(lam.grad, [0.25 * 0.1, -0.25 * 0.1])  # sigmoid' (0) = 1/4; above theta -> positive grad -> lambda falls
    lam.grad = None
    multiplier_loss(lam, [0.6, 0.1], [0.5, 0.2], equality=False, upper_bound=True).backward()
    close(lam.grad, [-0.025, 0.025])
    lam.grad = None
    multiplier_loss(lam, [0.6, 0.1], [0.5, 0.2], equality=True, squash=False).backward()
    close(lam.grad, [0.1, -0.1])  # identity: the raw violation
    with pytest.raises(ValueError):
        multiplier_loss(lam, [0.6], [0.5, 0.2], equality=True)


# --- the multiplier state --------------------------------------------------------------------------------


def test_init_is_one_shared_draw():
    draws = []
    for seed in range(200):
        m = LagrangeMultipliers(3, equality=True, generator=torch.Generator().manual_seed(seed))
        assert m.lam[0] == m.lam[1] == m.lam[2]
        draws.append(float(m.lam.detach()[0]))
    assert 0.007 < np.std(draws) < 0.013 and abs(np.mean(draws)) < 0.003
    assert LagrangeMultipliers(2, equality=False, squash=False).lam.tolist() == [0.5, 0.5]


def test_clipping_engages_for_large_violations():
    m = LagrangeMultipliers(2, equality=True, init=[0.0, 0.0], lr=0.1, grad_clip=0.5)
    info = m.step([10.0, -5.0], [0.0, 0.0])  # grad = violation (sech^2(0) = 1), norm ~11.2
    assert info["grad_norm"] == pytest.approx(math.hypot(10, 5))
    step = -m.lam.detach()
    close(step.norm(), 0.1 * 0.5, atol=1e-6)  # clipped to norm 0.5, times lr
    close(step / step.norm(), torch.tensor([10.0, -5.0], dtype=D) / math.hypot(10, 5), atol=1e-6)
    small = LagrangeMultipliers(2, equality=True, init=[0.0, 0.0], lr=0.1, grad_clip=0.5)
    small.step([0.03, -0.04], [0.0, 0.0])  # norm 0.05 < 0.5: not clipped
    close(small.lam.detach(), [-0.003, 0.004])


@pytest.mark.parametrize("equality,low,high", [(False, 0.0, 1.0), (True, -1.0, 1.0)])
def test_squashed_weights_stay_in_range(equality, low, high):
    for sign in (1, -1):
        m = LagrangeMultipliers(2, equality=equality, lr=1.0, momentum=0.9)
        for _ in range(300):
            m.step([sign * 100.0, -sign * 100.0], [0.0, 0.0])
        w = m.weights()
        assert torch.all((w >= low) & (w <= high))
        assert (w[0] - low < 0.05) if sign > 0 else (high - w[0] < 0.05)  # driven to the bounds


def test_direction_of_the_updates():
    for equality in (True, False):
        m = LagrangeMultipliers(2, equality=equality, init=[0.0, 0.0])
        m.step([0.9, 0.1], [0.5, 0.5])  # first above theta, second below
        assert m.lam[0] < 0 < m.lam[1]
    ub = LagrangeMultipliers(2, equality=False, upper_bound=True, init=[0.0, 0.0])
    ub.step([0.9, 0.1], [0.5, 0.5])
    assert ub.lam[0] > 0 > ub.lam[1]  # over the upper bound: mu rises, so the component's weight 1 - mu falls


def test_unsquashed_inequality_multipliers_are_clamped():
    m = LagrangeMultipliers(2, equality=False, squash=False, lr=0.5, grad_clip=10.0)
    for _ in range(10):
        m.step([1.0, 0.0], [0.0, 1.0])
    assert m.lam[0] == 0.0 and m.lam[1] > 0.5
    eq = LagrangeMultipliers(2, equality=True, squash=False, lr=0.5, grad_clip=10.0)
    for _ in range(10):
        eq.step([1.0, 0.0], [0.0, 1.0])
    assert eq.lam[0] < 0  # equality multipliers may go negative


def test_fixed_multipliers_do_not_move():
    m = LagrangeMultipliers(2, equality=False, squash=False, init=[1.0, 2.0], fixed=True)
    m.step([5.0, 5.0], [0.0, 0.0])
    assert m.lam.tolist() == [1.0, 2.0] and m.weights().tolist() == [1.0, 2.0]


def _run(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m.step(torch.rand(3, generator=g, dtype=D), [0.5, 0.4, 0.6])
        out.append(m.lam.detach().clone())
    return torch.stack(out)


@pytest.mark.parametrize(
    "kind",
    [
        dict(equality=True),
        dict(equality=False),
        dict(equality=False, squash=False),
        dict(equality=False, upper_bound=True),
    ],
)
def test_state_dict_round_trip_continues_identically(kind):
    a = LagrangeMultipliers(3, lr=0.3, momentum=0.5, generator=torch.Generator().manual_seed(0), **kind)
    _run(a, 4, seed=1)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    reference = _run(a, 5, seed=2)

    b = LagrangeMultipliers(3, lr=0.3, momentum=0.5, generator=torch.Generator().manual_seed(99), **kind)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    assert torch.equal(_run(b, 5, seed=2), reference)

    # the momentum buffer matters: restoring lambda alone gives a different trajectory
    c = LagrangeMultipliers(3, lr=0.3, momentum=0.5, **kind)
    buffer.seek(0)
    with torch.no_grad():
        c.lam.copy_(torch.load(buffer)["lam"])
    assert not torch.allclose(_run(c, 5, seed=2), reference)


def test_state_dict_refuses_another_kind():
    a = LagrangeMultipliers(2, equality=True)
    with pytest.raises(ValueError, match="does not match"):
        LagrangeMultipliers(2, equality=False).load_state_dict(a.state_dict())


def test_from_config():
    kw = dict(output_dir="/tmp/crlhf-test", use_cpu=True, bf16=False, report_to=[])
    m = LagrangeMultipliers.from_config(ConstrainedRLHFConfig(**kw, constraint_thresholds=[0.3, 0.2]), 2)
    assert m.equality and m.squash and not m.fixed and m.lr == 0.1 and m.momentum == 0.1 and m.grad_clip == 0.5
    fixed = LagrangeMultipliers.from_config(
        ConstrainedRLHFConfig(**kw, formulation="fixed", reward_weights=[1.0, 3.0]), 2
    )
    assert fixed.fixed and fixed.weights().tolist() == [1.0, 3.0]
    ub = LagrangeMultipliers.from_config(
        ConstrainedRLHFConfig(**kw, formulation="all", constraint_thresholds=[1, 2]), 2
    )
    assert ub.upper_bound and not ub.equality
    assert (
        LagrangeMultipliers.from_config(ConstrainedRLHFConfig(**kw, formulation="sat", constraint_thresholds=[1, 2]), 2)
        is None
    )


# --- rewards, RLOO, formulations ---------------------------------------------------------------------------


def test_rloo():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=D)
    close(rloo_advantages(r, 3), [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0])
    close(rloo_advantages(torch.stack([r, 2 * r], 1), 3)[:, 1], 2 * rloo_advantages(r, 3))
    with pytest.raises(ValueError):
        rloo_advantages(r, 4)


def test_formulation_advantages():
    g = torch.Generator().manual_seed(5)
    comps, kl = torch.rand(8, 2, generator=g, dtype=D), torch.randn(8, generator=g, dtype=D)
    lam = torch.tensor([0.3, -0.7], dtype=D)
    for f, eq in (("xi", True), ("nm", True), ("mu", False)):
        close(
            formulation_advantages(f, comps, kl, 4, lam),
            mix_advantages(rloo_advantages(comps, 4), rloo_advantages(kl, 4), lam, eq),
            atol=1e-12,
        )
    close(
        formulation_advantages("all", comps, kl, 4, lam),
        mix_upper_bound_advantages(rloo_advantages(comps, 4), rloo_advantages(kl, 4), lam),
        atol=1e-12,
    )
    # fixed: TRL's RLOO with beta = kl_coef on the weighted sum, normalised
    w = torch.tensor([1.0, 3.0], dtype=D)
    adv = rloo_advantages(comps @ w + kl, 4)
    close(formulation_advantages("fixed", comps, kl, 4, w), (adv - adv.mean()) / (adv.std() + 1e-8), atol=1e-12)
    sat = -((comps - torch.tensor([0.3, 0.2], dtype=D)) ** 2).sum(1)
    close(sat_rewards(comps, [0.3, 0.2]), sat)
    close(
        formulation_advantages("sat", comps, kl, 4, thresholds=[0.3, 0.2]),
        normalise_stream(rloo_advantages(sat + kl, 4)),
    )
    with pytest.raises(ValueError, match="valid"):
        formulation_advantages("ppo", comps, kl, 4, lam)
    with pytest.raises(ValueError, match="multipliers"):
        formulation_advantages("xi", comps, kl, 4)


# --- config -------------------------------------------------------------------------------------------------


def _config(**kw):
    return ConstrainedRLHFConfig(output_dir="/tmp/crlhf-test", use_cpu=True, bf16=False, report_to=[], **kw)


def test_config_defaults_and_validation():
    c = _config(constraint_thresholds=[0.44, 0.238])
    assert (
        c.formulation,
        c.squash_multipliers,
        c.multiplier_lr,
        c.multiplier_momentum,
        c.multiplier_grad_clip,
        c.multiplier_init_std,
        c.kl_coef,
        c.beta,
        c.nm_iterations,
        c.nm_tol,
    ) == ("xi", True, 0.1, 0.1, 0.5, 0.01, 0.2, 0.0, 100, 0.01)
    assert c.equality and not _config(formulation="mu", constraint_thresholds=[1.0]).equality
    with pytest.raises(ValueError, match="valid: mu, xi, all, sat, fixed, nm"):
        _config(formulation="ppo", constraint_thresholds=[1.0])
    for f in ("mu", "xi", "all", "sat", "nm"):
        with pytest.raises(ValueError, match="needs constraint_thresholds"):
            _config(formulation=f)
    _config(formulation="fixed")  # the baseline needs no thresholds
    with pytest.raises(ValueError, match="reward_weights"):
        _config(constraint_thresholds=[0.1, 0.2], reward_weights=[1.0])
    with pytest.raises(ValueError, match="kl_coef"):
        _config(constraint_thresholds=[0.1], beta=0.05)
    with pytest.raises(ValueError, match="momentum"):
        _config(constraint_thresholds=[0.1], multiplier_momentum=1.0)
    with pytest.raises(ValueError, match="3 reward functions"):
        c.validate_for(3)
    c.validate_for(2)


def test_config_nm():
    c = _config(formulation="nm", constraint_thresholds=[0.4, 0.2], nm_eval_function="eval_score")
    low, high = c.nm_box()
    close(low, [0.36, 0.18])
    close(high, [0.44, 0.22])
    assert c.nm_eval_steps == 10 and c.equality
    with pytest.raises(ValueError, match="nm_eval_function"):
        _config(formulation="nm", constraint_thresholds=[0.4, 0.2])
    with pytest.raises(ValueError, match="nm_init_low/nm_init_high need 2"):
        _config(
            formulation="nm",
            constraint_thresholds=[0.4, 0.2],
            nm_eval_function="e",
            nm_init_low=[0.1],
            nm_init_high=[0.5],
        )
    with pytest.raises(ValueError, match="< nm_init_high"):
        _config(
            formulation="nm",
            constraint_thresholds=[0.4, 0.2],
            nm_eval_function="e",
            nm_init_low=[0.5, 0.1],
            nm_init_high=[0.1, 0.5],
        )


# --- Nelder-Mead ---------------------------------------------------------------------------------------------


def quadratic(x, center=(0.3, -0.2)):
    x = np.asarray(x) - np.asarray(center)
    return float(2 * x[0] ** 2 + x[0] * x[1] + x[1] ** 2)  # positive definite, minimum 0 at center


def drive(nm, f, limit=10_000):
    asked = []
    while not nm.done and len(asked) < limit:
        x = nm.ask()
        asked.append(x)
        nm.tell(-f(x))  # NM minimises -score
    return asked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nm_finds_the_minimum_of_a_quadratic(seed):
    nm = NelderMead([-1, -1], [1, 1], tol=1e-10, max_iterations=400, seed=seed, cache_radius=1e-9)
    drive(nm, quadratic)
    assert np.abs(nm.best_point - [0.3, -0.2]).max() < 1e-3
    assert nm.best_score == pytest.approx(-quadratic(nm.best_point))


def test_nm_initial_simplex_is_seeded_and_in_the_box():
    a, b, c = (NelderMead([0.2, 0.4], [0.3, 0.6], seed=s) for s in (7, 7, 8))
    pa = [a.ask()]
    for _ in range(2):
        a.tell(0.0)  # values equal: keeps drawing the simplex
        pa.append(a.ask() if not a.done else None)
    pb = [b.ask()]
    assert np.array_equal(pa[0], pb[0]) and not np.array_equal(pa[0], c.ask())
    for p in pa:
        if p is not None:
            assert np.all((p >= [0.2, 0.4]) & (p <= [0.3, 0.6]))


def test_nm_coefficients_on_one_iteration():
    # the textbook variant (the official one: tests/trainers/test_nelder_mead.py)
    nm = NelderMead([0, 0], [1, 1], tol=1e-12, seed=3, variant="textbook")
    simplex = [nm.ask()]
    nm.tell(-1.0)  # f = 1 (best)
    simplex.append(nm.ask())
    nm.tell(-2.0)  # f = 2
    simplex.append(nm.ask())
    nm.tell(-3.0)  # f = 3 (worst)
    best, mid, worst = simplex
    c = (best + mid) / 2
    xr = nm.ask()
    np.testing.assert_allclose(xr, c + 1.0 * (c - worst))  # reflection, alpha = 1
    nm.tell(-0.5)  # better than the best: expansion
    np.testing.assert_allclose(nm.ask(), c + 2.0 * (xr - c))  # gamma = 2
    nm.tell(-0.7)  # worse than the reflected point: keep xr; simplex f = (0.5 @ xr, 1 @ best, 2 @ mid)
    c2 = (xr + best) / 2
    xr2 = nm.ask()
    np.testing.assert_allclose(xr2, c2 + (c2 - mid))
    nm.tell(-10.0)  # worse than the worst: inside contraction, rho = 0.5
    np.testing.assert_allclose(nm.ask(), c2 + 0.5 * (mid - c2))
    nm.tell(-20.0)  # contraction fails: shrink towards the best point (xr), sigma = 0.5
    np.testing.assert_allclose(nm.ask(), xr + 0.5 * (best - xr))
    nm.tell(-1.0)
    np.testing.assert_allclose(nm.ask(), xr + 0.5 * (mid - xr))


def test_nm_outside_contraction():
    nm = NelderMead([0, 0], [1, 1], tol=1e-12, seed=4, variant="textbook")
    pts = []
    for f in (1.0, 2.0, 3.0):
        pts.append(nm.ask())
        nm.tell(-f)
    best, mid, worst = pts
    c = (best + mid) / 2
    xr = nm.ask()
    nm.tell(-2.5)  # between the second worst and the worst: outside contraction
    np.testing.assert_allclose(nm.ask(), c + 0.5 * (xr - c))


def test_nm_cache():
    nm = NelderMead([0, 0], [1, 1], seed=0)
    x = nm.ask()
    nm.tell(0.25)
    assert nm.lookup(x) == 0.25
    assert nm.lookup(x + [4e-3, -4.9e-3]) == 0.25  # within 5e-3 in every coordinate
    assert nm.lookup(x + [4e-3, 6e-3]) is None
    # a long run on a quadratic: the simplex shrinks below the radius, later points come from the cache
    nm = NelderMead([-1, -1], [1, 1], tol=1e-14, max_iterations=300, seed=1)
    asked = drive(nm, quadratic)
    assert nm.cache_hits > 0
    for i, x in enumerate(asked):  # no point was asked twice (or within the radius of an earlier one)
        for y in asked[:i]:
            assert np.abs(x - y).max() >= 5e-3


def test_nm_stops_on_tol_and_budget():
    nm = NelderMead([0, 0], [1, 1], tol=0.01, max_iterations=1000, seed=0, variant="textbook")
    asked = drive(nm, lambda x: 5.0)  # flat: std 0 after the initial simplex (textbook: tested before every iteration)
    assert nm.done and nm.stop_reason == "tol" and len(asked) == 3 and nm.ask() is None
    with pytest.raises(RuntimeError):
        nm.tell(1.0)
    nm = NelderMead([0, 0], [1, 1], tol=0.0, max_iterations=10**9, seed=0, variant="textbook")
    drive(nm, lambda x: 5.0)  # tol 0 never fires; the simplex shrinks until it collapses into the cache radius
    assert nm.stop_reason == "collapsed" and np.abs(nm.simplex - nm.simplex[0]).max() < 5e-3
    nm = NelderMead([0, 0], [1, 1], tol=0.0, max_iterations=10**9, seed=0)
    drive(nm, lambda x: 5.0)  # official: no collapse stop; the safety stop ends a search that only hits the cache
    assert nm.stop_reason == "stalled" and nm.nm_steps < 2 * NelderMead.MAX_IDLE_STEPS
    nm = NelderMead([-1, -1], [1, 1], tol=1e-12, max_iterations=50, seed=0)
    while not nm.done:
        x = nm.ask()
        nm.tell(-quadratic(x), cost=10)
    assert nm.stop_reason == "budget" and 50 <= nm.iterations <= 50 + 10 * 3  # an iteration begun finishes


def test_nm_state_dict_replays():
    a = NelderMead([-1, -1], [1, 1], tol=1e-12, max_iterations=200, seed=5)
    for _ in range(9):
        a.tell(-quadratic(a.ask()), cost=2)
    state = a.state_dict()
    b = NelderMead([-1, -1], [1, 1], tol=1e-12, max_iterations=200, seed=5)
    b.load_state_dict(state)
    assert np.array_equal(a.ask(), b.ask()) and a.iterations == b.iterations == 18
    drive(a, quadratic)
    drive(b, quadratic)
    assert np.array_equal(a.best_point, b.best_point) and a.history == b.history
    with pytest.raises(ValueError, match="does not match"):
        NelderMead([-1, -1], [1, 1], seed=6).load_state_dict(state)


def evaluate_with_early_stop(train_step, evaluate, thresholds, n_iterations, eval_every):
    """One NM-PPO function evaluation as the trainer runs it: a training iteration, then ``tick``."""
    run = EarlyStopEvaluation(thresholds, n_iterations, eval_every)
    while True:
        train_step()
        result = run.tick(evaluate)
        if result is not None:
            return result


def test_early_stop_evaluation():
    trace = iter([(0.5, 0.5), (0.30, 0.15), (0.31, 0.205), (0.3, 0.2)])
    calls = {"train": 0, "eval": 0}

    def train():
        calls["train"] += 1

    def evaluate():
        calls["eval"] += 1
        r = next(trace)
        return -calls["eval"], r

    res = evaluate_with_early_stop(train, evaluate, [0.3, 0.2], n_iterations=40, eval_every=5)
    # (0.30, 0.15): r1 within 5% but r2 not (0.19..0.21); (0.31, 0.205): both within -> stops at the third evaluation
    assert res.early and res.iterations == 15 and res.score == -3 and res.component_values == [0.31, 0.205]
    assert calls == {"train": 15, "eval": 3}
    calls.update(train=0, eval=0)
    res = evaluate_with_early_stop(train, lambda: (7.0, [1.0, 1.0]), [0.3, 0.2], n_iterations=12, eval_every=5)
    assert not res.early and res.iterations == 12 and res.score == 7.0 and calls["train"] == 12


# --- the trainers ----------------------------------------------------------------------------------------------

from posttrain.recipes.config import load_recipe  # noqa: E402
from posttrain.recipes.train import build_trainer  # noqa: E402

REVIEWS = {"dataset": "builtin:review_prompts", "difficulty": None, "max_steps": 1}


def _perturb(model, seed=7, scale=0.05):
    # policy != reference, so the KL stream is not zero
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _loss_and_grads(name, tmp_path, **overrides):
    trainer = build_trainer(
        load_recipe(name, {"output_dir": str(tmp_path / name.replace("/", "-")), **REVIEWS, **overrides})
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we do not run
    _perturb(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(1234)  # the same sampling for both trainers
    trainer.model.train()
    inputs = trainer._prepare_inputs(batch)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return trainer, inputs, loss.item(), grads


@pytest.mark.parametrize("normalize", [False, True])
def test_fixed_weights_equal_stock_rloo(tmp_path, normalize):
    rewards = {
        "reward_funcs": ["offensiveness_cost", "length_fraction", "vader_sentiment"],
        "reward_weights": [1.0, 3.0, 0.5],
        "normalize_advantages": normalize,
    }
    stock, stock_inputs, stock_loss, stock_grads = _loss_and_grads("rloo/tiny", tmp_path, beta=0.05, **rewards)
    ours, inputs, loss, grads = _loss_and_grads(
        "constrained_rlhf/tiny", tmp_path, formulation="fixed", kl_coef=0.05, constraint_thresholds=None, **rewards
    )
    assert ours.beta == 0.0 and ours.ref_model is not None  # the KL is our stream, on TRL's reference model
    assert torch.equal(stock_inputs["completion_ids"], inputs["completion_ids"])
    assert stock_inputs["advantages"].abs().max() > 0.05  # a real signal, incl. the KL part
    assert abs(ours._metrics["train"]["constrained/kl"][-1]) > 1e-3
    torch.testing.assert_close(inputs["advantages"], stock_inputs["advantages"], atol=2e-6, rtol=1e-5)
    assert loss == pytest.approx(stock_loss, abs=1e-6)
    assert grads.keys() == stock_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fixed_weights_with_reward_clip_range_equal_stock_rloo(tmp_path):
    # RLOO clips the weighted reward sum to reward_clip_range before the KL penalty: so must formulation=fixed
    rewards = {
        "reward_funcs": ["offensiveness_cost", "length_fraction", "vader_sentiment"],
        "reward_weights": [1.0, 3.0, 0.5],
        "normalize_advantages": True,
        "reward_clip_range": [2.95, 2.98],
    }
    stock, stock_inputs, stock_loss, _ = _loss_and_grads("rloo/tiny", tmp_path, beta=0.05, **rewards)
    ours, inputs, loss, _ = _loss_and_grads(
        "constrained_rlhf/tiny", tmp_path, formulation="fixed", kl_coef=0.05, constraint_thresholds=None, **rewards
    )
    assert torch.equal(stock_inputs["completion_ids"], inputs["completion_ids"])
    summed = ours._component_rewards.double() @ torch.tensor([1.0, 3.0, 0.5], dtype=D)
    assert ((summed < 2.95) | (summed > 2.98)).any() and ((summed > 2.95) & (summed < 2.98)).any()  # the clip bites
    torch.testing.assert_close(inputs["advantages"], stock_inputs["advantages"], atol=2e-6, rtol=1e-5)
    assert loss == pytest.approx(stock_loss, abs=1e-6)
    # what is logged is what was trained on: the clipped reward with the KL stream, and these advantages
    kl = torch.tensor(ours._metrics["train"]["constrained/kl"][-1], dtype=D)
    # (sorted: TRL shuffles the generation batch after logging it)
    assert sorted(ours._logs["advantages"]) == pytest.approx(sorted(inputs["advantages"].tolist()), abs=1e-6)
    mixed = torch.tensor(list(ours._logs["extra"]["mixed_reward"]), dtype=D)
    assert mixed.shape == summed.shape and ours._metrics["train"]["reward"][-1] == pytest.approx(mixed.mean().item())
    assert (mixed - summed.clamp(2.95, 2.98)).mean().item() == pytest.approx(-0.05 * kl.item(), abs=1e-6)
    with pytest.raises(ValueError, match="reward_clip_range"):
        _config(formulation="xi", constraint_thresholds=[0.1], reward_clip_range=(0.0, 1.0))


def test_logged_reward_and_advantages_are_the_mixed_ones(tmp_path):
    # the completions table and TRL's reward metric show the xi mix the policy trains on, not RLOO's stock numbers
    trainer, inputs, _, _ = _loss_and_grads("constrained_rlhf/tiny", tmp_path)
    cfg = trainer.args
    lam0 = LagrangeMultipliers.from_config(cfg, 3, generator=torch.Generator().manual_seed(cfg.seed)).lam.detach()
    rewards = trainer._component_rewards.double()
    w = torch.tanh(lam0)
    logged = torch.tensor(list(trainer._logs["extra"]["mixed_reward"]), dtype=D)
    # mixed reward = (N - sum w) r_KL + sum_i w_i r_i with r_KL = -kl_coef * KL: the implied KL is the logged one
    kl = (logged - rewards @ w) / ((3 - w.sum()) * -cfg.kl_coef)
    assert kl.mean().item() == pytest.approx(trainer._metrics["train"]["constrained/kl"][-1], rel=1e-4)
    torch.testing.assert_close(mixed_rewards("xi", rewards, -cfg.kl_coef * kl, lam0, cfg.constraint_thresholds), logged)
    # (sorted: TRL shuffles the generation batch after logging it)
    assert sorted(trainer._logs["advantages"]) == pytest.approx(sorted(inputs["advantages"].tolist()), abs=1e-6)
    assert trainer._metrics["train"]["reward"][-1] == pytest.approx(logged.mean().item(), abs=1e-6)
    assert trainer._metrics["train"]["reward_std"][-1] == pytest.approx(logged.std().item(), abs=1e-6)
    assert len(trainer._logs["extra"]["mixed_reward"]) == len(trainer._logs["prompt"])  # the table's columns line up


def test_multipliers_step_once_per_optimizer_step_by_default(tmp_path):
    # the official cadence: a multiplier step after every policy minibatch. A generation batch of 8 completions feeds
    # two optimizer steps (steps_per_generation 2): two multiplier steps per generation, each on its own 4 completions
    overrides = {**REVIEWS, "max_steps": 4, "steps_per_generation": 2, "output_dir": str(tmp_path / "cadence")}
    trainer = build_trainer(load_recipe("constrained_rlhf/tiny", overrides))
    steps, generations, lams = [], [], []
    real_step, real_generate = trainer.multipliers.step, trainer._generate_and_score_completions

    def step(values, thresholds):
        steps.append(torch.as_tensor(values, dtype=D).clone())
        lams.append(trainer.multipliers.lam.detach().clone())
        return real_step(values, thresholds)

    def generate(inputs):
        out = real_generate(inputs)
        if trainer.model.training:
            generations.append(trainer._component_rewards.double().mean(0))
        return out

    trainer.multipliers.step, trainer._generate_and_score_completions = step, generate
    trainer.train()
    assert trainer.state.global_step == 4 and len(generations) == 2
    assert len(steps) == trainer.state.global_step, f"{len(steps)} multiplier steps for 4 optimizer steps"
    for g, (a, b) in zip(generations, (steps[0:2], steps[2:4])):
        close((a + b) / 2, g)  # each step's means are over its half of the generation batch
        assert not torch.allclose(a, b)
    assert not torch.equal(lams[0], lams[1])  # the second minibatch of a generation mixes with the moved multipliers
    lagged = build_trainer(
        load_recipe(
            "constrained_rlhf/tiny", {**overrides, "multiplier_step": "generation", "output_dir": str(tmp_path / "gen")}
        )
    )
    real = lagged.multipliers.step
    count = []
    lagged.multipliers.step = lambda v, t: count.append(1) or real(v, t)
    lagged.train()
    assert len(count) == 2  # the option: once per generation batch


def test_xi_advantages_and_one_multiplier_step_in_the_trainer(tmp_path):
    trainer, inputs, _, _ = _loss_and_grads("constrained_rlhf/tiny", tmp_path, multiplier_step="generation")
    cfg = trainer.args
    lam0 = LagrangeMultipliers.from_config(cfg, 3, generator=torch.Generator().manual_seed(cfg.seed)).lam.detach()
    rewards = trainer._component_rewards.double()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    kl = torch.tensor(metrics["constrained/kl"])
    # the advantages mix the per-stream RLOO advantages (``mix_advantages``) with the multipliers before the step
    names = trainer.reward_func_names
    assert [metrics[f"constrained/lambda/{n}"] for n in names] == pytest.approx(lam0.tolist())
    assert inputs["advantages"].std() > 0.1
    # ... and the multipliers took exactly one step on the batch means
    ref = LagrangeMultipliers.from_config(cfg, 3, generator=torch.Generator().manual_seed(cfg.seed))
    ref.step(rewards.mean(0), cfg.constraint_thresholds)
    assert torch.equal(trainer.multipliers.lam.detach(), ref.lam.detach())
    for n, v, t in zip(names, rewards.mean(0).tolist(), cfg.constraint_thresholds):
        assert metrics[f"constrained/value/{n}"] == pytest.approx(v) and metrics[f"constrained/threshold/{n}"] == t
    assert torch.isfinite(kl)


def test_grpo_twin_with_fixed_weights_and_no_kl_equals_stock_grpo(tmp_path):
    rewards = {
        "reward_funcs": ["offensiveness_cost", "vader_sentiment"],
        "reward_weights": [2.0, 1.0],
        "model_name_or_path": "tiny:llama",
    }
    _, stock_inputs, stock_loss, _ = _loss_and_grads("grpo/tiny", tmp_path, **rewards)
    ours, inputs, loss, _ = _loss_and_grads(
        "constrained_grpo/tiny", tmp_path, formulation="fixed", kl_coef=0.0, constraint_thresholds=None, **rewards
    )
    assert ours.ref_model is None  # kl_coef = 0: no reference model at all
    assert torch.equal(stock_inputs["completion_ids"], inputs["completion_ids"])
    assert stock_inputs["advantages"].abs().max() > 0.1
    torch.testing.assert_close(inputs["advantages"], stock_inputs["advantages"], atol=2e-6, rtol=1e-5)
    assert loss == pytest.approx(stock_loss, abs=1e-6)


def test_group_mean_advantages_match_grpo():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=D)
    close(group_mean_advantages(r, 3, "none"), [-2, -1, 3, -1, -1, 2])
    g1, g2 = r[:3], r[3:]
    close(
        group_mean_advantages(r, 3),
        torch.cat([(g1 - g1.mean()) / (g1.std() + 1e-4), (g2 - g2.mean()) / (g2.std() + 1e-4)]),
    )
    close(
        group_mean_advantages(torch.stack([r, r], 1), 3, "batch")[:, 1],
        (r - torch.tensor([3.0] * 3 + [1.0] * 3, dtype=D)) / (r.std() + 1e-4),
    )


def test_nm_runs_inside_the_trainer_and_resumes_its_search(tmp_path):
    # NM-PPO in one continuing run: every nm_steps_per_eval iterations the search gets a score and moves the
    # thresholds; the state file replays the search exactly
    overrides = {
        "formulation": "nm",
        "nm_eval_function": "vader_sentiment",
        "nm_steps_per_eval": 2,
        "nm_eval_every": 1,
        "nm_iterations": 50,
        "max_steps": 6,
        "output_dir": str(tmp_path / "nm"),
        "dataset": "builtin:review_prompts",
        "nm_score_on": "train",
    }
    trainer = build_trainer(load_recipe("constrained_rlhf/tiny", overrides))
    first = list(trainer.thresholds)
    low, high = trainer.args.nm_box()
    assert all(lo <= t <= hi for lo, t, hi in zip(low, first, high))
    trainer.train()
    assert len(trainer.nm.history) >= 3  # 6 iterations, at most 2 per evaluation
    assert trainer.nm.history[0][0] == pytest.approx(first)
    assert trainer.thresholds != first
    state = trainer.method_state()
    again = build_trainer(load_recipe("constrained_rlhf/tiny", overrides))
    again.load_method_state(state)
    assert again.thresholds == trainer.thresholds and again.nm.history == trainer.nm.history
    assert torch.equal(again.multipliers.lam, trainer.multipliers.lam)
    logged = [e["nm/evaluations"] for e in trainer.state.log_history if "nm/evaluations" in e]
    assert logged and logged[-1] == len(trainer.nm.history)


def test_nm_scores_the_eval_split_by_default(tmp_path):
    # as the official code scores a held-out split: at each evaluation point the policy generates on every eval_split
    # prompt (num_generations_eval each), and NM is told the mean nm_eval_function score of those completions
    overrides = {
        "formulation": "nm",
        "nm_eval_function": "vader_sentiment",
        "nm_steps_per_eval": 2,
        "nm_eval_every": 2,
        "nm_iterations": 50,
        "max_steps": 4,
        "output_dir": str(tmp_path / "nm"),
        "dataset": "builtin:review_prompts",
        "eval_split": "test",
        "num_samples": 8,
        "num_generations_eval": 2,
    }
    trainer = build_trainer(load_recipe("constrained_rlhf/tiny", overrides))
    calls, real = [], trainer.nm_eval

    def spy(prompts, completions, **kwargs):
        out = real(prompts=prompts, completions=completions, **kwargs)
        calls.append((trainer.model.training, list(out)))
        return out

    trainer.nm_eval = spy
    trainer.train()
    assert len(trainer.nm.history) == 2  # 4 iterations, 2 per evaluation
    assert calls and not any(training for training, _ in calls), "scored training rollouts"
    scores = [v for _, out in calls for v in out]
    per_evaluation = len(trainer.eval_dataset) * 2
    assert len(scores) == per_evaluation * 2, f"{len(scores)} completions scored for 2 evaluations of {per_evaluation}"
    for k, (_, score, _) in enumerate(trainer.nm.history):
        assert score == pytest.approx(float(np.mean(scores[k * per_evaluation : (k + 1) * per_evaluation])), abs=1e-6)
    assert not trainer._metrics["eval"]  # the NM generations leave TRL's eval metrics alone
    from posttrain import UserError

    with pytest.raises(UserError, match="set eval_split"):  # when the recipe is read, before any model loads
        load_recipe("constrained_rlhf/tiny", {**overrides, "eval_split": None})


def test_a_trained_reward_model_is_a_component(tmp_path):
    from safetensors.torch import load_file

    from posttrain.cli import main

    rm_dir = tmp_path / "rm"
    assert main(["train", "reward/tiny", "--output_dir", str(rm_dir), "--max_steps", "1"]) == 0
    trainer, _, _, _ = _loss_and_grads(
        "constrained_rlhf/tiny",
        tmp_path,
        reward_funcs=[f"rm:{rm_dir}", "length_fraction"],
        constraint_thresholds=[0.0, 0.5],
    )
    rm = trainer.reward_funcs[0]
    saved = load_file(str(rm_dir / "model.safetensors"))
    name = next(k for k in saved if k.startswith("score"))
    torch.testing.assert_close(rm.state_dict()[name], saved[name])  # TRL loaded our checkpoint, score head included
    scores = trainer._component_rewards[:, 0]
    assert torch.isfinite(scores).all() and scores.std() > 0
    assert trainer.reward_func_names[0] == "rm"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_constrained_rlhf_multipliers_are_identical_on_both_ranks(backend, tmp_path, run_env):
    # Each rank holds other completions in a step: a multiplier step on the rank-local means would part the ranks.
    import json
    import subprocess

    from support import ROOT, two_process_launch

    config = {"ddp": "cpu_2proc.yaml", "zero3": "zero3.yaml"}[backend]
    cmd = two_process_launch(config, str(ROOT / "tests" / "helpers" / "crlhf_ranks.py"), str(tmp_path))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["lam"] == ranks[1]["lam"] and ranks[0]["momentum"] == ranks[1]["momentum"]  # bit for bit
    assert len(set(ranks[0]["lam"])) > 1  # the constraints moved apart from their shared initial draw
    assert any(abs(k) > 0 for k in ranks[0]["kl"][1:])  # the KL stream is live (reference model under ZeRO-3 too)


def test_xi_advantages_mix_with_the_multipliers_before_their_step(tmp_path):
    # multiplier_step: generation: the batch's advantages are mixed with lambda as it was before this batch's
    # multiplier step (the step uses the batch's values, so mixing after it would leak them into the weights).
    # kl_coef 0: the KL stream is zero, so the advantages follow from the logged component rewards alone.
    trainer, inputs, _, _ = _loss_and_grads(
        "constrained_rlhf/tiny", tmp_path, multiplier_step="generation", kl_coef=0.0
    )
    cfg = trainer.args
    lam0 = LagrangeMultipliers.from_config(cfg, 3, generator=torch.Generator().manual_seed(cfg.seed)).lam.detach()
    rewards = trainer._component_rewards.double()
    zeros = torch.zeros(rewards.size(0), dtype=rewards.dtype)

    def mixed(lam):
        return formulation_advantages(
            cfg.formulation, rewards, zeros, trainer.num_generations, lam, trainer.thresholds, cfg.squash_multipliers
        )

    before, after = mixed(lam0), mixed(trainer.multipliers.lam.detach().double())
    assert not torch.allclose(before, after, atol=1e-4)  # the step moved the mix: the test can tell them apart
    got = inputs["advantages"].double()
    assert got.numel() == before.numel()
    # TRL shuffles the generation batch before splitting it: compare as multisets
    torch.testing.assert_close(got.sort().values, before.sort().values, atol=1e-5, rtol=0)
