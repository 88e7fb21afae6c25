"""The ALF-LB experiment (experiments/moe_balance.py; EXPERIMENTS.md) in its --quick mode: 25 steps of a
tiny DeepSeek-V3-style MoE LM on stdlib docstrings, no balancing vs aux loss vs aux-free (u = 1e-4, 1e-3, 1e-2), run
through the package's callback. Over 25 steps only the fast rate has had time to act; what must already hold:
the bias moves by sign steps only where aux-free is on, the fast rate balances the loads (batch and held-out) well
below no balancing, and none of it costs language-model loss."""

import math
import sys

import pytest
from support import load_experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick():
    module = load_experiment("moe_balance")
    try:
        yield module.main(["--quick"])
    finally:
        sys.modules.pop("moe_balance", None)


def test_quick_run_balances_with_the_bias_only(quick):
    s = quick["summary"]
    none, aux = s["none"], s["aux_loss a=1e-3"]
    slow, mid, fast = (s[f"aux_free u={u}"] for u in ("0.0001", "0.001", "0.01"))
    steps, layers, experts = quick["setting"]["steps"], quick["setting"]["layers"], quick["setting"]["experts"]
    assert steps == 25 and quick["setting"]["seeds"] == 1
    # the bias is the method's only lever: untouched without aux-free, sign steps of exactly u otherwise
    assert none["bias_norm"] == 0 and aux["bias_norm"] == 0
    assert 0 < slow["bias_norm"] < mid["bias_norm"] < fast["bias_norm"]
    for u, r in ((1e-4, slow), (1e-3, mid), (1e-2, fast)):
        assert r["bias_norm"] <= u * steps * math.sqrt(layers * experts) + 1e-9
    # the fast rate has balanced the loads already: batch (last quarter) and held-out, well below no balancing
    assert fast["maxvio_batch_last"] < 0.85 * none["maxvio_batch_last"]
    assert fast["maxvio_global"] < 0.75 * none["maxvio_global"]
    # ... without costing LM loss (all variants start from the same weights and see the same batches)
    for r in (aux, slow, mid, fast):
        assert abs(r["eval_loss"] / none["eval_loss"] - 1) < 0.01
    assert set(quick["claim_checks"]) and isinstance(quick["claim_holds"], bool)
