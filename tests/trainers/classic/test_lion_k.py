"""Lion-K: a constrained quadratic plus exactness tests against a reference step.

The quadratic f(x) = 1/2 ||x - c||^2, c = (3, -2, 0.5, 0.05), lr 0.01 decayed linearly to 0 over 4000 steps, betas
(0.9, 0.99), is this project's smallest check of the paper's main result (Chen, Liu, Liang, Liu, arXiv 2310.05898:
Lion-K with weight decay lambda minimises f(x) + (1/lambda) K*(lambda x)). Its optima are derived here in closed
form (``optimum``): clip(c, +-1/lambda) for K = l1, the projection of c onto the l2 ball of radius 1/lambda for l2,
c / (1 + lambda) for sq. The pass bars (within 1e-2 of the optimum, the constraint held from step 1000 on, entry from
||x0||_inf = 10 within 1000 steps) come from a numpy prototype of the same runs, written from the math before this
implementation.
"""

import copy
import math

import pytest
import torch

from posttrain.trainers.classic.lion_k import LionK, constraint_stats, lion_k_kwargs

torch.set_num_threads(1)

C = torch.tensor([3.0, -2.0, 0.5, 0.05], dtype=torch.float64)
LR0, T, BETAS = 0.01, 4000, (0.9, 0.99)


def run_quadratic(K, lam, x0=None, steps=T):
    """Minimise f(x) = 1/2 ||x - c||^2 with lr decayed linearly from LR0 to 0 over T steps.
    Returns the final x and the constraint norm after every step."""
    x = (torch.zeros(4, dtype=torch.float64) if x0 is None else x0.clone()).requires_grad_(True)
    opt = LionK([x], lr=LR0, betas=BETAS, weight_decay=lam, K=K)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / T)
    norms = []
    for _ in range(steps):
        x.grad = x.detach() - C  # grad of f, set directly: autograd would triple the test's time
        opt.step()
        sched.step()
        xd = x.detach()
        norms.append(xd.abs().max().item() if K == "l1" else xd.norm().item())
    return x.detach(), norms


def optimum(K, lam):
    if K == "l1":  # box ||x||_inf <= 1/lam
        return C.clamp(-1.0 / lam, 1.0 / lam)
    if K == "l2":  # projection onto the l2 ball of radius 1/lam
        return C * min(1.0, (1.0 / lam) / C.norm().item())
    return C / (1.0 + lam)  # sq: ridge, argmin f + lam/2 ||x||^2


@pytest.mark.parametrize("lam", [1.0, 2.0])
@pytest.mark.parametrize("K", ["l1", "l2", "sq"])
def test_converges_to_constrained_optimum(K, lam):
    x, norms = run_quadratic(K, lam)
    err = (x - optimum(K, lam)).abs().max().item()
    assert err <= 1e-2, f"K={K} lam={lam}: final x={x.tolist()} err={err}"
    if K != "sq":  # the hidden constraint holds from step 1000 on (up to one step)
        assert max(norms[999:]) <= 1.0 / lam + LR0


@pytest.mark.parametrize("lam", [1.0, 2.0])
def test_l1_enters_box_from_far_outside(lam):
    x0 = torch.tensor([10.0, -10.0, 10.0, -10.0], dtype=torch.float64)
    _, norms = run_quadratic("l1", lam, x0=x0, steps=1500)
    inside = [t for t, n in enumerate(norms) if n <= 1.0 / lam + LR0]
    assert inside and inside[0] < 1000, "never entered the box within 1000 steps"
    assert max(norms[inside[0] :]) <= 1.0 / lam + LR0, "left the box after entering"


def reference_step(x, m_neg, g, lr, b1, b2, wd, dK):
    """One Lion-K step in the paper's own convention (m tracks the NEGATIVE gradient)."""
    x_new = x + lr * (dK(b1 * m_neg - (1 - b1) * g) - wd * x)
    m_new = b2 * m_neg - (1 - b2) * g
    return x_new, m_new


REFERENCE_DK = {
    "l1": torch.sign,
    "l2": lambda v: v / v.norm() if v.norm() > 0 else torch.zeros_like(v),
    "sq": lambda v: v,
    "lp": lambda v: v.sign() * v.abs() ** 2 / (v.abs() ** 3).sum() ** (2 / 3),  # p = 3
}


@pytest.mark.parametrize("K", ["l1", "l2", "sq", "lp"])
def test_matches_reference_step_on_random_problems(K):
    gen = torch.Generator().manual_seed(1234 + len(K))
    for _ in range(5):  # fresh random problem each time
        shape = (int(torch.randint(1, 6, (1,), generator=gen)), 3)
        c = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
        lam = float(torch.rand(1, generator=gen)) * 2 + 0.1
        lr = float(torch.rand(1, generator=gen)) * 0.1 + 1e-3
        x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(True)
        opt = LionK([x], lr=lr, betas=BETAS, weight_decay=lam, K=K, p=3.0 if K == "lp" else None)
        x_ref, m_ref = x.detach().clone(), torch.zeros_like(c)
        for _ in range(6):
            g = x_ref - c
            x_ref, m_ref = reference_step(x_ref, m_ref, g, lr, *BETAS, lam, REFERENCE_DK[K])
            opt.zero_grad()
            (0.5 * (x - c).pow(2).sum()).backward()
            opt.step()
            torch.testing.assert_close(x.detach(), x_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[x]["exp_avg"], -m_ref, rtol=1e-12, atol=1e-12)


def test_callable_k_and_param_groups_and_none_grad():
    torch.manual_seed(0)
    a, b, frozen = (torch.randn(5, requires_grad=True) for _ in range(3))
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    frozen0 = frozen.detach().clone()
    grouped = LionK(
        [{"params": [a], "K": torch.sign}, {"params": [b, frozen], "K": "l2", "lr": 0.05, "weight_decay": 0.3}], lr=0.01
    )
    sep1 = LionK([a2], lr=0.01, K="l1")
    sep2 = LionK([b2], lr=0.05, weight_decay=0.3, K="l2")
    for _ in range(4):
        for opt, ps in ((grouped, (a, b)), (sep1, (a2,)), (sep2, (b2,))):
            opt.zero_grad()
            sum((p**3).sum() for p in ps).backward()
            opt.step()
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    torch.testing.assert_close(b, b2, rtol=0, atol=0)
    assert torch.equal(frozen, frozen0) and frozen not in grouped.state


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    w0 = torch.randn(3, 4)
    target = torch.randn(3, 4)

    def grad_step(opt, w):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()

    w = w0.clone().requires_grad_(True)
    opt = LionK([w], lr=0.02, weight_decay=0.5, K="l2")
    for _ in range(20):
        grad_step(opt, w)

    w_a = w0.clone().requires_grad_(True)
    opt_a = LionK([w_a], lr=0.02, weight_decay=0.5, K="l2")
    for _ in range(10):
        grad_step(opt_a, w_a)
    saved = copy.deepcopy(opt_a.state_dict())
    w_b = w_a.detach().clone().requires_grad_(True)
    opt_b = LionK([w_b], lr=999.0)  # hyper-parameters must come back from the state dict
    opt_b.load_state_dict(saved)
    for _ in range(10):
        grad_step(opt_b, w_b)
    assert torch.equal(w_b, w)


def test_lion_k_kwargs_parsing():
    assert lion_k_kwargs(None) == {"K": "l1", "betas": (0.9, 0.99)}
    assert lion_k_kwargs("") == {"K": "l1", "betas": (0.9, 0.99)}
    assert lion_k_kwargs("K=l2") == {"K": "l2", "betas": (0.9, 0.99)}
    assert lion_k_kwargs(" K=lp, beta1=0.95 ,beta2=0.98,p=3") == {"K": "lp", "betas": (0.95, 0.98), "p": 3.0}
    LionK([torch.zeros(2, requires_grad=True)], **lion_k_kwargs("K=lp,p=3"))  # usable as is
    with pytest.raises(ValueError, match="valid keys: K, beta1, beta2, p"):
        lion_k_kwargs("K=l2,momentum=0.9")
    with pytest.raises(ValueError, match="unknown K"):
        lion_k_kwargs("K=l7")
    with pytest.raises(ValueError, match="key=value"):
        lion_k_kwargs("K")
    with pytest.raises(ValueError, match="not a number"):
        lion_k_kwargs("beta1=abc")
    with pytest.raises(ValueError, match="p >= 1"):
        lion_k_kwargs("K=lp")


def test_argument_validation():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="valid: l1, l2, sq, lp"):
        LionK(p, K="linf")
    with pytest.raises(ValueError, match="betas"):
        LionK(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        LionK(p, lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        LionK(p, weight_decay=float("nan"))
    with pytest.raises(ValueError, match="p >= 1"):
        LionK(p, K="lp", p=0.5)
    opt = LionK(p)
    with pytest.raises(ValueError, match="unknown K"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "K": "bad"})
    assert len(opt.param_groups) == 1  # the rejected group was not kept


@pytest.mark.parametrize("p, same_as", [(1.0, "l1"), (2.0, "l2")])
def test_lp_reduces_to_l1_and_l2(p, same_as):
    torch.manual_seed(1)
    w0, target = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    results = []
    for kw in ({"K": "lp", "p": p}, {"K": same_as}):
        w = w0.clone().requires_grad_(True)
        opt = LionK([w], lr=0.05, weight_decay=0.7, **kw)
        for _ in range(5):
            w.grad = w.detach() - target
            opt.step()
        results.append(w.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_constraint_stats():
    x = torch.tensor([1.0, -0.999, 0.2, 0.0])
    s = constraint_stats(LionK([x], lr=0.01, weight_decay=1.0, K="l1"))
    assert math.isclose(s["max_constraint"], 1.0) and s["frac_at_bound"] == 0.5
    s = constraint_stats(LionK([x], lr=0.01, weight_decay=2.0, K="l2"))
    assert math.isclose(s["max_constraint"], 2 * x.norm().item(), rel_tol=1e-6) and s["frac_at_bound"] == 1.0
    assert constraint_stats(LionK([x], weight_decay=1.0, K="sq")) == {"max_constraint": 0.0, "frac_at_bound": 0.0}
