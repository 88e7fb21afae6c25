"""The generic Nelder-Mead search (trainers/nelder_mead.py): the default variant evaluates exactly the points the
official NM-PPO loop evaluates (ConstrainedRL4LMs, ``NelderMeadTrainer.train_and_eval`` with its cached
``NelderMeadFunc``), on known functions and from the same initial simplex."""

import numpy as np
import pytest

from posttrain.trainers.nelder_mead import NelderMead


def official_loop(f, simplex, budget, tol, alpha=1.0, gamma=2.0, rho=0.5, sigma=0.5, radius=5e-3):
    """The official loop re-stated for a plain function: each new evaluation costs 1 iteration of the budget.
    Returns the points evaluated (cache misses), in order."""
    evaluated, cache = [], {}

    def func(x):
        key = tuple(x)
        if key in cache:
            return cache[key]
        for k in cache:  # the first cached point strictly within the radius in every coordinate
            if np.all(np.abs(np.array(k) - x) < radius):
                return cache[k]
        evaluated.append(np.array(x, dtype=np.float64))
        cache[key] = f(x)
        return cache[key]

    simplex = np.array(simplex, dtype=np.float64)
    n = simplex.shape[1]
    while len(evaluated) < budget:
        simplex = np.array(sorted(simplex, key=func))
        best_val = func(simplex[0])
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + alpha * (centroid - simplex[-1])
        if best_val <= func(reflected) < func(simplex[-2]):
            simplex[-1] = reflected
            continue
        if func(reflected) < func(simplex[0]):
            expanded = centroid + gamma * (reflected - centroid)
            simplex[-1] = expanded if func(expanded) < func(simplex[0]) else reflected
            continue
        contracted = centroid + rho * (simplex[-1] - centroid)
        if func(contracted) < func(simplex[-1]):
            simplex[-1] = contracted
            continue
        for i in range(1, n + 1):
            simplex[i] = simplex[0] + sigma * (simplex[i] - simplex[0])
        if np.std([func(v) for v in simplex]) < tol:
            break
    return evaluated


def drive(nm, f):
    asked = []
    while not nm.done:
        x = nm.ask()
        asked.append(x)
        nm.tell(-f(x))  # NM minimises -score
    return asked


def skewed(x):  # a rotated quadratic, minimum near (0.5, -0.3, ...)
    x = np.asarray(x)
    return float(np.sum((x - 0.5 + 0.8 * np.arange(x.size) % 1) ** 2) + 0.7 * x[0] * x[-1])


def rosenbrock(x):
    return float(sum(100 * (x[i + 1] - x[i] ** 2) ** 2 + (1 - x[i]) ** 2 for i in range(len(x) - 1)))


@pytest.mark.parametrize("f", [skewed, rosenbrock])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tol", [1e-3, 1e-9])
def test_nm_evaluates_the_official_sequence_of_points(f, dim, seed, tol):
    nm = NelderMead([-1.0] * dim, [1.0] * dim, tol=tol, max_iterations=80, seed=seed)
    asked = drive(nm, f)
    expected = official_loop(f, asked[: dim + 1], budget=80, tol=tol)  # the same initial simplex
    assert len(asked) == len(expected), f"{len(asked)} points evaluated, the official loop evaluates {len(expected)}"
    np.testing.assert_array_equal(np.array(asked), np.array(expected))
    assert nm.stop_reason in ("budget", "tol")


def test_nm_spread_test_only_after_a_shrink():
    # a flat function: the initial simplex already has std 0, but the official loop tests the spread only after a
    # shrink: reflect, (inside) contract, shrink the n other points, then stop
    nm = NelderMead([0, 0], [1, 1], tol=0.01, max_iterations=1000, seed=0)
    asked = drive(nm, lambda x: 5.0)
    assert nm.stop_reason == "tol" and len(asked) == 3 + 1 + 1 + 2, len(asked)
    best, mid, worst = asked[:3]
    c = (best + mid) / 2
    np.testing.assert_allclose(asked[3], c + (c - worst))  # reflection
    np.testing.assert_allclose(asked[4], c + 0.5 * (worst - c))  # inside contraction
    np.testing.assert_allclose(asked[5], best + 0.5 * (mid - best))  # shrink
    textbook = NelderMead([0, 0], [1, 1], tol=0.01, max_iterations=1000, seed=0, variant="textbook")
    assert len(drive(textbook, lambda x: 5.0)) == 3 and textbook.stop_reason == "tol"


def initial_simplex(nm) -> list:
    """Score a 2-D search's first three points 1, 2, 3 (so they are best, middle, worst); returns them."""
    points = []
    for f in (1.0, 2.0, 3.0):
        points.append(nm.ask())
        nm.tell(-f)
    return points


def test_nm_expansion_is_accepted_against_the_best_point():
    nm = NelderMead([0, 0], [1, 1], tol=1e-12, seed=3)
    best, mid, worst = initial_simplex(nm)
    c = (best + mid) / 2
    xr = nm.ask()
    nm.tell(-0.5)  # better than the best: expand
    xe = nm.ask()
    np.testing.assert_allclose(xe, c + 2.0 * (xr - c))
    nm.tell(-0.7)  # worse than the reflected point but better than the best: the official loop keeps xe
    assert any(np.array_equal(p, xe) for p in nm.simplex) and not any(np.array_equal(p, xr) for p in nm.simplex)


def test_nm_has_no_outside_contraction():
    nm = NelderMead([0, 0], [1, 1], tol=1e-12, seed=4)
    best, mid, worst = initial_simplex(nm)
    c = (best + mid) / 2
    nm.ask()
    nm.tell(-2.5)  # between the second worst and the worst: still the inside contraction
    np.testing.assert_allclose(nm.ask(), c + 0.5 * (worst - c))
    tb = NelderMead([0, 0], [1, 1], tol=1e-12, seed=4, variant="textbook")
    for f in (1.0, 2.0, 3.0):
        tb.tell(-f)
    xr = tb.ask()
    tb.tell(-2.5)
    np.testing.assert_allclose(tb.ask(), c + 0.5 * (xr - c))  # the textbook outside contraction


def test_nm_variant_is_checked_and_saved():
    with pytest.raises(ValueError, match="variant"):
        NelderMead([0], [1], variant="scipy")
    a = NelderMead([-1, -1], [1, 1], seed=5)
    a.tell(-skewed(a.ask()))
    state = a.state_dict()
    with pytest.raises(ValueError, match="does not match"):
        NelderMead([-1, -1], [1, 1], seed=5, variant="textbook").load_state_dict(state)
    old = {"settings": {k: v for k, v in state["settings"].items() if k != "variant"}, "history": state["history"]}
    b = NelderMead([-1, -1], [1, 1], seed=5, variant="textbook")
    b.load_state_dict(old)  # a state saved before the variants existed replays as textbook
    assert b.history == a.history
