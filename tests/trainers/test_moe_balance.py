"""ALF-LB (aux-loss-free MoE balancing): a worked example, property tests of the pure math, agreement
with transformers' DeepSeek-V3 router, token counting under gradient checkpointing, the callback, the Qwen3-MoE
patch and the 2-rank all-reduce; the moe_* recipe keys with real trainers (rate 0 = stock, micro-batch accumulation,
the aux-loss hook, resume), posttrain moe upcycle and MaxVio_global.

The worked example (E = 4, K = 2, T = 4, sigmoid scores, u = 1e-3) was computed with numpy from the rules in the
docstring of ``posttrain/trainers/moe_balance.py``: top-K selection on s + b with the gates gathered from the unbiased
s and renormalised (deepseek-ai/DeepSeek-V3 at 1ea5a1a7ed7429e25ba2fa2c76fe74fa5968d348, ``inference/model.py``
``Gate.forward``), and the update b_i <- b_i + u sign(c_bar - c_i) of Wang et al. (arXiv 2408.15664; taken from
secondary descriptions of the paper, whose text was not read).
"""

import json
import math
import os
import random
import shutil

import pytest
import torch
from support import free_port

from posttrain import UserError
from posttrain.recipes.config import build_recipe, load_recipe
from posttrain.trainers.moe_aux_loss import RouterAuxLoss, aux_balance_loss, sequence_aux_balance_loss
from posttrain.trainers.moe_balance import (
    MoEBalanceCallback,
    MoEBalanceConfig,
    apply_bias_update,
    bias_step_size,
    biased_topk,
    install_expert_bias,
    load_entropy,
    max_violation,
    moe_metrics,
    update_expert_bias,
)
from posttrain.trainers.moe_routers import BIAS_NAME, RoutingCounter, expert_biases, expert_counts, find_routers

torch.set_num_threads(1)

# --- worked example: E = 4, K = 2, T = 4, sigmoid scores, u = 1e-3 --------------------------------------------
S = torch.tensor(
    [[0.90, 0.80, 0.10, 0.20], [0.85, 0.70, 0.30, 0.60], [0.60, 0.20, 0.10, 0.95], [0.95, 0.40, 0.50, 0.30]]
)


def sorted_pairs(indices, weights):
    """Per-token (index, weight) pairs sorted by index: compares selections regardless of order."""
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def test_worked_example_zero_bias():
    idx, w = biased_topk(S, torch.zeros(4), 2)
    assert idx.tolist() == [[0, 1], [0, 1], [3, 0], [0, 2]]
    torch.testing.assert_close(
        w, torch.tensor([[0.5294, 0.4706], [0.5484, 0.4516], [0.6129, 0.3871], [0.6552, 0.3448]]), atol=1e-4, rtol=0
    )
    counts = expert_counts(idx, 4)
    assert counts.tolist() == [4, 2, 1, 1]
    new = update_expert_bias(torch.zeros(4), counts, 1e-3)
    torch.testing.assert_close(new, torch.tensor([-0.001, 0.0, 0.001, 0.001]), atol=1e-9, rtol=0)
    assert new[1] == 0  # sign(0) = 0: a balanced expert keeps its bias


def test_worked_example_shifted_bias():
    bias = torch.tensor([-0.5, 0.0, 0.0, 0.0])
    idx, w = biased_topk(S, bias, 2)
    assert idx.tolist() == [[1, 0], [1, 3], [3, 1], [2, 0]]
    torch.testing.assert_close(
        w, torch.tensor([[0.4706, 0.5294], [0.5385, 0.4615], [0.8261, 0.1739], [0.3448, 0.6552]]), atol=1e-4, rtol=0
    )
    counts = expert_counts(idx, 4)
    assert counts.tolist() == [2, 3, 1, 2]
    new = update_expert_bias(bias, counts, 1e-3)
    torch.testing.assert_close(new - bias, torch.tensor([0.0, -0.001, 0.001, 0.0]), atol=1e-7, rtol=0)


def test_worked_example_metrics():
    counts = torch.tensor([4, 2, 1, 1])
    assert max_violation(counts) == pytest.approx(1.0)  # (4 - 2) / 2
    assert load_entropy(counts) == pytest.approx(
        -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125))
    )
    assert max_violation(torch.tensor([2, 2, 2, 2])) == 0.0
    assert load_entropy(torch.tensor([2, 2, 2, 2])) == pytest.approx(math.log(4))
    assert load_entropy(torch.tensor([8, 0, 0, 0])) == 0.0
    assert load_entropy(torch.tensor([2, 2, 2, 2]), normalized=True) == pytest.approx(1.0)
    assert max_violation(torch.zeros(4)) == 0.0 and load_entropy(torch.zeros(4)) == 0.0
    assert max_violation(torch.tensor([[4, 2, 1, 1], [2, 2, 2, 2]])) == pytest.approx(0.5)  # mean over layers


# --- properties on fresh random inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("norm", [True, False])
def test_weights_are_unbiased_scores_at_chosen_indices(seed, norm):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(64, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(8, generator=g, dtype=torch.float64) * 0.3
    idx, w = biased_topk(scores, bias, 3, norm_topk_prob=norm, scaling=2.5)
    expect = scores.gather(1, idx)
    if norm:
        expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(w, 2.5 * expect)
    # the selection is the top-k of the *biased* scores
    torch.testing.assert_close(
        idx.sort(-1).values, (scores + bias).topk(3, dim=-1).indices.sort(-1).values, rtol=0, atol=0
    )
    # ... which differs from the unbiased top-k somewhere, so the weights really are not from the biased scores
    assert not torch.equal(idx.sort(-1).values, scores.topk(3, dim=-1).indices.sort(-1).values)


@pytest.mark.parametrize("seed", range(5))
def test_zero_bias_is_plain_topk(seed):
    g = torch.Generator().manual_seed(100 + seed)
    scores = torch.rand(50, 16, generator=g)
    idx, w = biased_topk(scores, torch.zeros(16), 4, norm_topk_prob=False)
    plain = scores.topk(4, dim=-1)
    assert torch.equal(idx, plain.indices)
    torch.testing.assert_close(w, plain.values, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(5))
def test_large_bias_forces_selection(seed):
    g = torch.Generator().manual_seed(200 + seed)
    scores = torch.rand(40, 8, generator=g)
    j = int(torch.randint(8, (1,), generator=g))
    bias = torch.zeros(8)
    bias[j] = 10.0
    idx, w = biased_topk(scores, bias, 2)
    assert (idx == j).any(dim=-1).all()
    assert (idx[:, 0] == j).all()  # sorted by biased score
    torch.testing.assert_close(w.sum(-1), torch.ones(40))  # still renormalised unbiased scores


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_group,topk_group,k", [(4, 1, 2), (4, 2, 3), (8, 3, 2), (2, 1, 4)])
def test_group_limited_selection_stays_in_top_groups(seed, n_group, topk_group, k):
    g = torch.Generator().manual_seed(300 + seed)
    E = 16
    scores = torch.rand(100, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.2
    idx, _ = biased_topk(scores, bias, k, n_group=n_group, topk_group=topk_group)
    size = E // n_group
    biased = (scores + bias).view(100, n_group, size)
    gscore = biased.topk(min(2, size), dim=-1).values.sum(-1)
    allowed = gscore.topk(topk_group, dim=-1).indices  # (N, topk_group)
    chosen_groups = idx // size
    assert (chosen_groups.unsqueeze(-1) == allowed.unsqueeze(1)).any(-1).all()
    # and within the allowed experts it is the plain biased top-k
    masked = (scores + bias).clone()
    keep = torch.zeros(100, n_group, dtype=torch.bool).scatter_(1, allowed, True).repeat_interleave(size, 1)
    masked[~keep] = -float("inf")
    assert torch.equal(idx.sort(-1).values, masked.topk(k, dim=-1).indices.sort(-1).values)
    # group limitation binds for some token (otherwise the test would not test it)
    assert not torch.equal(idx.sort(-1).values, (scores + bias).topk(k, dim=-1).indices.sort(-1).values)


def test_biased_topk_gradients_reach_scores_not_bias():
    logits = torch.randn(6, 4, requires_grad=True)
    bias = torch.zeros(4, requires_grad=True)
    _, w = biased_topk(logits.sigmoid(), bias, 2)
    (w * torch.arange(2.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert bias.grad is None


def test_biased_topk_rejects_bad_shapes():
    with pytest.raises(ValueError):
        biased_topk(S, torch.zeros(3), 2)
    with pytest.raises(ValueError):
        biased_topk(S, torch.zeros(4), 2, n_group=3)
    with pytest.raises(ValueError):
        biased_topk(S, torch.zeros(4), 3, n_group=2, topk_group=1)  # only 2 experts eligible


@pytest.mark.parametrize("seed", range(5))
def test_sign_rule_moves_by_exactly_rate(seed):
    g = torch.Generator().manual_seed(400 + seed)
    E = 8
    bias = torch.randn(E, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 50, (E,), generator=g)
    counts[0] = 1000  # surely overloaded
    mean = counts.double().mean()
    new = update_expert_bias(bias, counts, 1e-3, "sign")
    over, under, level = counts > mean, counts < mean, counts == mean
    assert torch.equal(new[over], bias[over] - 1e-3)
    assert torch.equal(new[under], bias[under] + 1e-3)
    assert torch.equal(new[level], bias[level])
    assert over.any() and under.any()


@pytest.mark.parametrize("rule", ["sign", "proportional", "decaying"])
def test_rate_zero_leaves_bias_unchanged(rule):
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(8, generator=g)
    counts = torch.randint(0, 100, (8,), generator=g)
    new = update_expert_bias(bias, counts, 0.0, rule, step=3)
    assert torch.equal(new, bias) and new is not bias


def test_proportional_and_decaying_rules():
    bias = torch.zeros(4, dtype=torch.float64)
    counts = torch.tensor([4, 2, 1, 1])  # c_bar = 2, e / c_bar = [-1, 0, .5, .5]
    e_frac = torch.tensor([-1.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(update_expert_bias(bias, counts, 1e-2, "proportional"), 1e-2 * e_frac)
    for n in (0, 3, 15):
        step = 1e-2 * (1 + n / 4) ** -0.5
        assert bias_step_size(1e-2, n, 0.5, 4) == pytest.approx(step)
        new = update_expert_bias(bias, counts, 1e-2, "decaying", step=n, decay_power=0.5, decay_steps=4)
        torch.testing.assert_close(new, step * e_frac)
    with pytest.raises(ValueError):
        update_expert_bias(bias, counts, 1e-3, "multiplicative")
    # batched layers are independent; an empty layer stays put
    two = update_expert_bias(torch.zeros(2, 4), torch.stack([counts, torch.zeros(4, dtype=torch.long)]), 1e-3)
    torch.testing.assert_close(two, torch.tensor([[-1e-3, 0, 1e-3, 1e-3], [0, 0, 0, 0]]))


def test_config_validation():
    MoEBalanceConfig()
    for bad in (
        dict(moe_balance="x"),
        dict(moe_bias_rule="x"),
        dict(moe_bias_rate=-1.0),
        dict(moe_bias_decay_steps=0.0),
        dict(moe_bias_rate=float("nan")),
    ):
        with pytest.raises(ValueError):
            MoEBalanceConfig(**bad)


# --- transformers models --------------------------------------------------------------------------------------


@pytest.fixture
def deepseek():
    from posttrain.recipes.tiny import make_tiny

    model, _ = make_tiny("deepseek_v3")  # 2 MoE layers, 8 experts, top-2, n_group 2, topk_group 1
    return model


def test_biased_topk_matches_deepseek_v3_router(deepseek):
    g = torch.Generator().manual_seed(7)
    for _, router in find_routers(deepseek):
        router.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.05)
        router.weight.data.normal_(0, 0.5, generator=g)  # spread the scores so bias and groups matter
        hidden = torch.randn(3, 11, 64, generator=g)
        logits, w_hf, idx_hf = router(hidden)
        idx, w = biased_topk(
            logits.sigmoid(),
            router.e_score_correction_bias,
            router.top_k,
            n_group=router.num_group,
            topk_group=router.topk_group,
            norm_topk_prob=router.norm_topk_prob,
            scaling=router.routed_scaling_factor,
        )
        i1, w1 = sorted_pairs(idx, w)
        i2, w2 = sorted_pairs(idx_hf, w_hf)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(w1, w2)
        # the bias changes the selection of some tokens (so the agreement covers the biased path)
        plain, _ = biased_topk(logits.sigmoid(), torch.zeros(8), 2, n_group=2, topk_group=1)
        assert not torch.equal(plain.sort(-1).values, i1)


def _fwd_bwd(model, ids, mask=None):
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_counts_once_under_gradient_checkpointing(deepseek, reentrant):
    torch.manual_seed(0)
    ids = torch.randint(4, 512, (3, 9))
    tokens, k = ids.numel(), 2
    deepseek.train()
    counter = RoutingCounter(deepseek)
    _fwd_bwd(deepseek, ids)
    plain = [c.clone() for c in counter.counts]
    assert all(int(c.sum()) == tokens * k for c in plain)

    deepseek.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    naive = [torch.zeros(8, dtype=torch.long) for _ in counter.counts]  # a hook without the guard

    def naive_hook(i):
        def hook(module, args, out):
            naive[i] += torch.bincount(out[2].flatten(), minlength=8)

        return hook

    handles = [m.register_forward_hook(naive_hook(i)) for i, (_, m) in enumerate(counter.routers)]
    counter.reset()
    _fwd_bwd(deepseek, ids)
    for h in handles:
        h.remove()
    assert all(int(c.sum()) == tokens * k for c in counter.counts)
    assert all(torch.equal(a, b) for a, b in zip(counter.counts, plain))
    # the recomputation really happened: an unguarded hook counts every token twice
    assert all(torch.equal(n, 2 * b) for n, b in zip(naive, plain))
    counter.remove()


def test_counts_skip_padding_and_accumulate_micro_batches(deepseek):
    torch.manual_seed(1)
    ids = torch.randint(4, 512, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    counter = RoutingCounter(deepseek)
    _fwd_bwd(deepseek, ids, mask)
    assert all(int(c.sum()) == int(mask.sum()) * 2 for c in counter.counts)
    _fwd_bwd(deepseek, ids)  # a second micro-batch adds up
    assert all(int(c.sum()) == (int(mask.sum()) + ids.numel()) * 2 for c in counter.counts)
    counter.reset()
    assert all(int(c.sum()) == 0 for c in counter.counts)
    counter.remove()
    _fwd_bwd(deepseek, ids)
    assert all(int(c.sum()) == 0 for c in counter.counts)  # hooks gone


def test_callback_updates_deepseek_bias_in_torch_loop(deepseek, tmp_path):
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

    cfg = MoEBalanceConfig(moe_bias_rate=1e-2)
    cb = MoEBalanceCallback(cfg, model=deepseek)
    state, control = TrainerState(), TrainerControl()
    opt = torch.optim.AdamW(deepseek.parameters(), lr=1e-3)
    deepseek.train()
    torch.manual_seed(2)
    biases = expert_biases(deepseek)
    assert all(b.dtype == torch.float32 and not b.requires_grad for b in biases)
    expected = [b.clone() for b in biases]
    for _step in range(3):
        cb.on_step_begin(None, state, control)
        for _ in range(2):  # two micro-batches per optimizer step
            _fwd_bwd(deepseek, torch.randint(4, 512, (2, 8)))
        counts = [c.clone() for c in cb.counter.counts]
        assert all(int(c.sum()) == 2 * 16 * 2 for c in counts)
        opt.step()
        opt.zero_grad()
        state.global_step += 1
        cb.on_step_end(None, state, control)
        expected = [update_expert_bias(e, c, 1e-2) for e, c in zip(expected, counts)]
        for b, e in zip(expert_biases(deepseek), expected):
            torch.testing.assert_close(b, e, rtol=0, atol=1e-7)
        m = cb.last_metrics
        assert m["moe/maxvio"] == pytest.approx(max_violation(torch.stack(counts)))
        assert m["moe/layer0/bias_norm"] == pytest.approx(float(expected[0].norm()), abs=1e-6)
        assert {"moe/layer1/maxvio", "moe/layer1/load_entropy", "moe/load_entropy", "moe/bias_norm"} <= set(m)
    assert any(float(b.abs().sum()) > 0 for b in expert_biases(deepseek))
    # the biases are buffers: in the state dict, through save_pretrained / from_pretrained, still fp32
    keys = [k for k in deepseek.state_dict() if k.endswith(BIAS_NAME)]
    assert keys == [f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (0, 1)]
    deepseek.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for b, e in zip(expert_biases(again), expected):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, e, rtol=0, atol=0)


def test_callback_none_mode_logs_without_updating(deepseek):
    from transformers import TrainerControl, TrainerState

    cb = MoEBalanceCallback(MoEBalanceConfig(moe_balance="none"), model=deepseek)
    state = TrainerState()
    cb.on_step_begin(None, state, TrainerControl())
    _fwd_bwd(deepseek, torch.randint(4, 512, (2, 8)))
    state.global_step = 1
    cb.on_step_end(None, state, TrainerControl())
    assert all(float(b.abs().sum()) == 0 for b in expert_biases(deepseek))
    assert cb.last_metrics["moe/maxvio"] > 0


def test_callback_in_hf_trainer(deepseek, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(3)
    rows = [{"input_ids": torch.randint(4, 512, (8,)).tolist()} for _ in range(8)]
    ds = Dataset.from_list([{**r, "labels": r["input_ids"]} for r in rows])
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    trainer = Trainer(model=deepseek, args=args, train_dataset=ds)
    cb = MoEBalanceCallback(MoEBalanceConfig(), trainer=trainer)
    trainer.train()
    # per layer and step: 2 micro-batches x 2 rows x 8 tokens x k = 2 assignments
    assert [h["moe/assignments"] for h in cb.history] == [64, 64]
    logged = [h for h in trainer.state.log_history if "moe/maxvio" in h]
    assert len(logged) == 2 and "loss" in logged[0] and "moe/layer1/bias_norm" in logged[0]
    for b in expert_biases(deepseek):  # two sign steps of 1e-3
        assert 0 < float(b.abs().max()) <= 2e-3 + 1e-9


def test_qwen3_moe_patch_selection_only():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
    )
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    routers = install_expert_bias(model)
    assert len(routers) == 2 and all(type(m).__name__ == "Qwen3MoeTopKRouter" for _, m in routers)
    assert [k for k in model.state_dict() if k.endswith(BIAS_NAME)] == [
        "model.layers.0.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.gate.e_score_correction_bias",
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)  # zero bias: unchanged
    router = routers[0][1]
    router.e_score_correction_bias[5] = 1.0
    hidden = torch.randn(10, 32)
    logits, w, idx = router(hidden)
    assert (idx == 5).any(-1).all()
    probs = logits.float().softmax(-1)
    expect = probs.gather(1, idx)
    torch.testing.assert_close(w, expect / expect.sum(-1, keepdim=True))
    # counting and updating work on the patched model too
    counter = RoutingCounter(model)
    with torch.no_grad():
        model(input_ids=ids)
    assert all(int(c.sum()) == ids.numel() * 2 for c in counter.counts)
    apply_bias_update(counter, rate=1e-3)
    assert float(expert_biases(model)[1].abs().sum()) > 0


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_patch_keeps_other_softmax_routers_outputs(arch):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
    )
    cfg = (
        Qwen2MoeConfig(
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=8,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            **common,
        )
        if arch == "qwen2_moe"
        else MixtralConfig(num_local_experts=8, **common)
    )
    torch.manual_seed(6)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    routers = install_expert_bias(model)
    assert len(routers) == 2 and all(type(m).__name__.endswith("TopKRouter") for _, m in routers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-6)
        routers[0][1].e_score_correction_bias[3] = 1.0
        _, _, idx = routers[0][1](torch.randn(5, 32))
    assert (idx == 3).any(-1).all()


def test_install_rejects_unknown_router():
    class FooTopkRouter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 2))

    model = torch.nn.Sequential(FooTopkRouter())
    with pytest.raises(NotImplementedError, match="FooTopkRouter"):
        install_expert_bias(model)
    with pytest.raises(ValueError, match="install_expert_bias"):
        apply_bias_update(model, [torch.ones(4, dtype=torch.long)])


def test_moe_metrics_per_layer_and_overall():
    counts = [torch.tensor([4, 2, 1, 1]), torch.tensor([2, 2, 2, 2])]
    biases = [torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.zeros(4)]
    m = moe_metrics(counts, biases, ["layer0", "layer1"])
    assert m["moe/layer0/maxvio"] == pytest.approx(1.0) and m["moe/layer1/maxvio"] == 0.0
    assert m["moe/maxvio"] == pytest.approx(0.5) and m["moe/maxvio_max"] == pytest.approx(1.0)
    assert m["moe/layer0/bias_norm"] == pytest.approx(5.0) and m["moe/bias_norm"] == pytest.approx(5.0)
    assert m["moe/layer1/load_entropy"] == pytest.approx(math.log(4))
    assert "moe/layer0/maxvio" not in moe_metrics(counts, biases, per_layer=False)


# --- 2 ranks over gloo: the loads are summed, every rank applies the same update ------------------------------


class ToyTopkRouter(torch.nn.Module):
    def __init__(self, E=4):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(E, 2))
        self.register_buffer(BIAS_NAME, torch.zeros(E))


def _rank_main(rank, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = torch.nn.ModuleDict({"r": ToyTopkRouter()})
    local = [torch.tensor([3, 0, 1, 0]) if rank == 0 else torch.tensor([0, 0, 1, 3])]  # sum [3, 0, 2, 3]
    reduced = apply_bias_update(model, local, rate=1e-3)
    aux = RouterAuxLoss.__new__(RouterAuxLoss)  # only its running sums: 2.0 over 1 forward, 3.0 over 3
    aux.total, aux.forwards = (torch.tensor(2.0), 1) if rank == 0 else (torch.tensor(3.0), 3)
    torch.save(
        {"bias": model["r"].e_score_correction_bias.clone(), "counts": reduced[0], "aux": aux.mean()},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_all_reduce_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["counts"].tolist() == r1["counts"].tolist() == [3, 0, 2, 3]
    # c_bar = 2: each rank alone would move expert 0 differently; the reduced loads give one answer
    torch.testing.assert_close(r0["bias"], torch.tensor([-1e-3, 1e-3, 0.0, -1e-3]))
    assert torch.equal(r0["bias"], r1["bias"])
    assert r0["aux"] == r1["aux"] == pytest.approx(5.0 / 4)  # moe/aux_loss: per forward over both ranks


# --- recipes: moe_* keys with any trainer --------------------------------------------------------------------

SFT = dict(
    method="sft",
    dataset="builtin:arithmetic",
    num_samples=32,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    max_length=64,
    learning_rate=1e-2,
    max_steps=3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    bf16=False,
    dtype="float32",
    seed=0,
)


def recipe_of(tmp_path, **values):
    return build_recipe({**SFT, "output_dir": str(tmp_path), **values}, {}, "test")


def fixed_length_texts(path, n=16, tokens=14, seed=0):
    """n texts of exactly ``tokens`` tiny-tokenizer tokens each: batches without padding, so any split of the same
    rows into (micro-)batches routes every token identically."""
    from posttrain.recipes.tiny import _WORDS, build_tokenizer

    tok, rng, rows = build_tokenizer(), random.Random(seed), []
    while len(rows) < n:
        text = " ".join(rng.choices(_WORDS, k=10))
        if len(tok(text, add_special_tokens=False)["input_ids"]) == tokens:
            rows.append({"text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_recipe_moe_keys_are_kept_aside():
    recipe = load_recipe("moe_balance/tiny_sft")
    assert recipe.method == "sft" and recipe.moe.moe_balance == "aux_free"
    assert recipe.moe.moe_bias_rate == 1e-3 and recipe.moe.moe_bias_rule == "sign"
    assert not hasattr(recipe.config, "moe_balance")
    assert load_recipe("sft/tiny").moe is None  # absent: off, stock training
    rl = load_recipe("grpo/tiny", {"moe_balance": "aux_free", "moe_bias_rate": "0"})  # opt-in for RL, rate 0: frozen
    assert rl.moe.moe_bias_rate == 0.0 and rl.method == "grpo"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"moe_bias_rate": 0.01}, "no moe_balance"),
        ({"moe_balance": "aux_fre"}, "valid: none, aux_free, aux_loss"),
        ({"moe_balance": "aux_free", "moe_bias_rate": "fast"}, "expects float"),
        ({"moe_balance": "aux_free", "moe_bias_rate": -1}, "moe_bias_rate must be finite and >= 0"),
        ({"moe_balance": "none", "moe_bias_rate": 0.01}, "needs moe_balance: aux_free"),
        ({"moe_balance": "aux_free", "moe_aux_loss_coef": 0.01}, "needs moe_balance: aux_loss"),
        ({"moe_balance": "aux_loss", "router_aux_loss_coef": 0.01}, "keep moe_aux_loss_coef"),
        ({"moe_balance": "aux_free", "router_aux_loss_coef": 0.01}, "fights the bias"),
        ({"moe_balance": "aux_free", "gradient_checkpointing_kwargs": '{"use_reentrant": true}'}, "reentrant"),
        ({"moe_balanc": "aux_free"}, "did you mean 'moe_balance'"),
    ],
)
def test_recipe_moe_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_recipe("sft/tiny", overrides)


@pytest.mark.parametrize("recipe", ["grpo/tiny", "rloo/tiny"])
def test_aux_free_with_vllm_is_refused(recipe):
    """The biases are buffers and TRL's vLLM weight sync sends ``named_parameters()`` only, so vLLM would
    route the rollouts with stale biases: refused when the recipe is read, one line naming both keys."""
    with pytest.raises(UserError) as err:
        load_recipe(recipe, {"moe_balance": "aux_free", "use_vllm": True})
    msg = str(err.value)
    assert "\n" not in msg and "use_vllm" in msg and "moe_balance: aux_free" in msg and "buffers" in msg, msg
    for ok in ({"moe_balance": "none", "use_vllm": True}, {"moe_balance": "aux_free", "use_vllm": False}):
        load_recipe(recipe, ok)  # loads only / no vLLM: fine


def test_recipe_moe_keys_on_an_auxiliary_method():
    with pytest.raises(UserError, match="method 'fedau' has no model"):
        load_recipe("fedau/quadratic_fedau", {"moe_balance": "aux_free"})


def test_model_checks_run_before_the_model_loads(tmp_path, monkeypatch):
    import posttrain.recipes.train as train_mod

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the MoE checks")

    monkeypatch.setattr(train_mod, "guarded", no_model)
    with pytest.raises(UserError, match="needs a mixture-of-experts model.*llama"):
        train_mod.build_trainer(recipe_of(tmp_path, model_name_or_path="tiny:llama", moe_balance="aux_free"))
    # TRL's aux-loss path crashes on DeepSeek-V3 configs: caught for any recipe, moe_* keys or not
    with pytest.raises(UserError, match="DeepseekV3Config lacks"):
        train_mod.build_trainer(recipe_of(tmp_path, model_name_or_path="tiny:deepseek_v3", router_aux_loss_coef=0.01))


@pytest.mark.parametrize("arch,experts", [("qwen2_moe", 8), ("qwen3_moe", 8), ("mixtral", 8)])
def test_aux_free_on_a_softmax_router_is_refused_unless_allowed(arch, experts, tmp_path, monkeypatch):
    """The expert bias (rate 1e-3) is for sigmoid scores (DeepSeek-V3; Megatron-LM refuses it on softmax):
    a softmax router with a non-zero rate needs ``moe_bias_on_softmax: true``, one line, before the model loads."""
    import posttrain.recipes.train as train_mod
    from posttrain.recipes.tiny import tiny_model_path

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the MoE checks")

    monkeypatch.setattr(train_mod, "guarded", no_model)
    with pytest.raises(UserError) as err:
        train_mod.build_trainer(recipe_of(tmp_path, model_name_or_path=f"tiny:{arch}", moe_balance="aux_free"))
    msg = str(err.value)
    assert "\n" not in msg and "softmax" in msg and "`moe_bias_on_softmax: true`" in msg, msg
    assert "Megatron-LM" in msg and f"{4e-3 / experts:.1e} for its {experts} experts" in msg, msg
    # allowed explicitly, or rate 0 (a frozen zero bias routes like the stock model): the checks pass, the model loads
    for extra in ({"moe_bias_on_softmax": True}, {"moe_bias_rate": 0.0}):
        with pytest.raises(AssertionError, match="the model was loaded"):
            train_mod.build_trainer(
                recipe_of(tmp_path, model_name_or_path=f"tiny:{arch}", moe_balance="aux_free", **extra)
            )
    # the API refuses too (MoEBalanceCallback on a model), and allows with the option
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(arch))
    with pytest.raises(ValueError, match="moe_bias_on_softmax: true"):
        MoEBalanceCallback(MoEBalanceConfig(), model=model)
    MoEBalanceCallback(MoEBalanceConfig(moe_bias_on_softmax=True), model=model)
    assert all(float(b.abs().sum()) == 0 for b in expert_biases(model))
    # a sigmoid router needs no option
    assert load_recipe("moe_balance/tiny_sft").moe.moe_bias_on_softmax is False


def test_trl_aux_loss_crash_that_the_guard_prevents(tmp_path, monkeypatch):
    """Without the guard TRL 1.16 dies inside training (the forward that ``trl/trainer/utils.py``
    ``add_fused_lm_head`` installs reads ``num_experts``, which ``DeepseekV3Config`` lacks); when TRL fixes it, this
    fails: drop the guard."""
    import posttrain.recipes.train as train_mod
    from posttrain.recipes.train import build_trainer

    monkeypatch.setattr(train_mod, "prepare_moe", lambda recipe, path: None)  # where build_trainer looks it up
    trainer = build_trainer(
        recipe_of(tmp_path, model_name_or_path="tiny:deepseek_v3", router_aux_loss_coef=0.01, max_steps=1)
    )
    with pytest.raises(AttributeError, match="num_experts"):
        trainer.train()


def _run(recipe):
    from posttrain.recipes.train import build_trainer

    trainer = build_trainer(recipe)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_rate_zero_is_stock_training(arch, tmp_path):
    # stock: no moe_* keys (Qwen3-MoE's own aux loss off, as aux_free turns it off)
    stock_extra = {"router_aux_loss_coef": 0.0} if arch == "qwen3_moe" else {}
    stock, stock_logs = _run(recipe_of(tmp_path / "a", model_name_or_path=f"tiny:{arch}", **stock_extra))
    frozen, frozen_logs = _run(
        recipe_of(tmp_path / "b", model_name_or_path=f"tiny:{arch}", moe_balance="aux_free", moe_bias_rate=0.0)
    )
    assert [h["loss"] for h in frozen_logs] == [h["loss"] for h in stock_logs]  # step for step, exactly
    assert [h["grad_norm"] for h in frozen_logs] == [h["grad_norm"] for h in stock_logs]
    a, b = stock.model.state_dict(), frozen.model.state_dict()
    assert set(b) - set(a) == (
        {f"model.layers.{i}.mlp.gate.{BIAS_NAME}" for i in (0, 1)} if arch == "qwen3_moe" else set()
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(float(x.abs().sum()) == 0 for x in expert_biases(frozen.model))
    assert all("moe/maxvio" in h and "moe/layer1/load_entropy" in h for h in frozen_logs)


def test_micro_batches_accumulate_like_one_batch(tmp_path):
    data = fixed_length_texts(tmp_path / "data.jsonl")
    common = dict(
        model_name_or_path="tiny:deepseek_v3",
        dataset=data,
        max_steps=1,
        moe_balance="aux_free",
        moe_bias_rate=1e-2,
        num_samples=16,
    )
    big, _ = _run(recipe_of(tmp_path / "a", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common))
    small, _ = _run(recipe_of(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common))
    counts = [c.tolist() for c in big.moe_balance.last_counts]
    assert counts == [c.tolist() for c in small.moe_balance.last_counts]
    assert all(sum(c) == 4 * 15 * 2 for c in counts)  # 4 rows x (14 + EOS) tokens x top-2
    for x, y in zip(expert_biases(big.model), expert_biases(small.model)):
        assert torch.equal(x, y) and float(x.abs().sum()) > 0


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("checkpointing", [None, False, True])
def test_aux_loss_hook_adds_exactly_the_balance_loss_gradient(deepseek, checkpointing, scope):
    torch.manual_seed(5)
    ids = torch.randint(4, 512, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    deepseek.train()
    routers = find_routers(deepseek)
    seen = {}

    def keep(i):
        def hook(module, args, out):
            if not _in_backward_pass():
                seen[i] = (out[0], out[2])

        return hook

    # explicit: LM loss + sum over layers of aux_balance_loss on the router's own logits and selection
    handles = [m.register_forward_hook(keep(i)) for i, (_, m) in enumerate(routers)]
    out = deepseek(input_ids=ids, attention_mask=mask, labels=ids)
    if scope == "batch":
        aux = sum(
            aux_balance_loss(seen[i][0].sigmoid(), seen[i][1], 8, alpha=0.1, mask=mask.reshape(-1))
            for i in range(len(routers))
        )
    else:  # DeepSeek-V3's sequence-wise loss: the 3 rows of 9 tokens
        aux = sum(
            sequence_aux_balance_loss(
                seen[i][0].sigmoid().view(3, 9, 8), seen[i][1].view(3, 9, -1), 8, alpha=0.1, mask=mask
            )
            for i in range(len(routers))
        )
    (out.loss + 0.5 * aux).backward()
    for h in handles:
        h.remove()
    expect = {n: p.grad.clone() for n, p in deepseek.named_parameters() if p.grad is not None}
    deepseek.zero_grad(set_to_none=True)
    # hook: only the LM loss goes to backward (with gradient checkpointing: the recomputation carries the aux loss)
    if checkpointing is not None:
        deepseek.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    counter = RoutingCounter(deepseek)
    hook = RouterAuxLoss(routers, alpha=0.1, scale_fn=lambda: 0.5, mask_source=counter, scope=scope, model=deepseek)
    out2 = deepseek(input_ids=ids, attention_mask=mask, labels=ids)
    out2.loss.backward()
    assert hook.forwards == 1 and hook.mean() == pytest.approx(float(aux.detach()), rel=1e-6)
    got = {n: p.grad for n, p in deepseek.named_parameters() if p.grad is not None}
    assert got.keys() == expect.keys()
    for n in expect:
        torch.testing.assert_close(got[n], expect[n], rtol=1e-5, atol=1e-7, msg=n)
    # ... and the aux term really is in there: without the hook the router gradients differ
    hook.remove()
    counter.remove()
    deepseek.zero_grad(set_to_none=True)
    deepseek(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    gate = [n for n in expect if n.endswith("mlp.gate.weight")]
    plain = {n: p.grad for n, p in deepseek.named_parameters() if n in gate}
    assert len(gate) == 2 and all(not torch.allclose(plain[n], expect[n]) for n in gate)


def _in_backward_pass():
    return torch._C._current_graph_task_id() != -1


def test_aux_loss_mode_uses_the_models_own_loss_or_the_hook(tmp_path):
    qwen, qwen_logs = _run(
        recipe_of(
            tmp_path / "q",
            model_name_or_path="tiny:qwen3_moe",
            moe_balance="aux_loss",
            moe_aux_loss_coef=0.01,
            max_steps=2,
        )
    )
    assert qwen.args.router_aux_loss_coef == 0.01 and qwen.aux_loss_enabled and qwen.moe_balance.aux is None
    assert all("aux_loss" in h and "moe/maxvio" in h for h in qwen_logs)  # TRL's own aux-loss metric
    ds, ds_logs = _run(
        recipe_of(
            tmp_path / "d",
            model_name_or_path="tiny:deepseek_v3",
            moe_balance="aux_loss",
            moe_aux_loss_coef=0.01,
            max_steps=2,
        )
    )
    assert not ds.aux_loss_enabled and ds.moe_balance.aux is None  # hooks removed at the end of training
    # 2 layers x alpha x sum_i f_i P_i, which is 1 at perfect balance and grows with imbalance (<= E / K)
    assert all(0.02 * 0.9 < h["moe/aux_loss"] < 0.02 * 4 for h in ds_logs)
    assert all(float(b.abs().sum()) == 0 for b in expert_biases(ds.model))  # biases frozen in aux_loss mode
    # DeepSeek-V3's sequence-wise loss (arXiv 2412.19437 eqs. 17-20): Qwen's own loss is batch-wise, so posttrain's
    # hook computes it
    seq, seq_logs = _run(
        recipe_of(
            tmp_path / "s",
            model_name_or_path="tiny:qwen3_moe",
            moe_balance="aux_loss",
            moe_aux_loss_coef=0.01,
            moe_aux_loss_scope="sequence",
            max_steps=2,
        )
    )
    assert seq.args.router_aux_loss_coef == 0.0 and not seq.aux_loss_enabled
    assert all(0.02 * 0.9 < h["moe/aux_loss"] < 0.02 * 8 for h in seq_logs)


def test_glm4_moe_router_is_selection_only_like_deepseek(tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.recipes.upcycle import upcycle

    model = AutoModelForCausalLM.from_pretrained(
        upcycle("tiny:llama", tmp_path / "moe", experts=8, top_k=2, n_group=2, topk_group=1)
    )
    g = torch.Generator().manual_seed(11)
    routers = find_routers(model)
    assert [type(m).__name__ for _, m in routers] == ["Glm4MoeTopkRouter"] * 2
    for _, router in routers:
        router.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.05)
        router.weight.data.normal_(0, 0.5, generator=g)
        logits, w_hf, idx_hf = router(torch.randn(3, 7, 64, generator=g))
        idx, w = biased_topk(
            logits.sigmoid(),
            router.e_score_correction_bias,
            2,
            n_group=2,
            topk_group=1,
            scaling=router.routed_scaling_factor,
        )
        i1, w1 = sorted_pairs(idx, w)
        i2, w2 = sorted_pairs(idx_hf, w_hf)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(w1, w2)


# --- posttrain moe upcycle -----------------------------------------------------------------------------------


def test_upcycle_noise_zero_gives_the_dense_models_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.recipes.tiny import tiny_model_path
    from posttrain.recipes.upcycle import PROVENANCE, upcycle

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")).eval()
    out = upcycle("tiny:llama", tmp_path / "moe", experts=4, top_k=2, noise=0.0)
    moe = AutoModelForCausalLM.from_pretrained(out).eval()  # offline (HF_HUB_OFFLINE), no remote code
    assert type(moe).__name__ == "Glm4MoeForCausalLM" and moe.config.n_routed_experts == 4
    assert json.loads((out / PROVENANCE).read_text())["experts"] == 4
    ids = torch.randint(4, 512, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        a = dense(input_ids=ids, attention_mask=mask).logits
        b = moe(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # every expert is the MLP; the router is random (it picks, but all picks compute the same)
    experts = moe.model.layers[0].mlp.experts.gate_up_proj
    assert all(torch.equal(experts[0], experts[e]) for e in range(4))
    assert all(float(b.abs().sum()) == 0 for b in expert_biases(moe))
    # with noise the experts differ and the function moves a little
    noisy = AutoModelForCausalLM.from_pretrained(
        upcycle("tiny:llama", tmp_path / "noisy", experts=4, top_k=2, noise=0.01)
    ).eval()
    e = noisy.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(e[0], e[1])
    with torch.no_grad():
        c = noisy(input_ids=ids, attention_mask=mask).logits
    assert 0 < float((c - a).abs().max()) < 0.05


def test_upcycle_cli_and_training(tmp_path, capsys):
    from posttrain.cli import main

    dst = tmp_path / "moe"
    assert main(["moe", "upcycle", "tiny:llama", str(dst), "--experts", "4", "--top_k", "2", "--seed", "1"]) == 0
    assert main(["moe", "upcycle", "tiny:llama", str(dst), "--experts", "4", "--top_k", "2"]) == 2  # not empty
    assert main(["moe", "upcycle", "tiny:qwen3", str(tmp_path / "q"), "--experts", "4", "--top_k", "2"]) == 2
    assert (
        main(
            [
                "moe",
                "upcycle",
                "tiny:llama",
                str(tmp_path / "s"),
                "--experts",
                "4",
                "--top_k",
                "2",
                "--shared_experts",
                "0",
            ]
        )
        == 2
    )
    assert main(["moe", "upcycle", "tiny:llama", str(tmp_path / "k"), "--experts", "4", "--top_k", "5"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "model_type 'qwen3'" in err and "shared_experts must be >= 1" in err
    # the upcycled model trains with native aux-free balancing (GLM-4-MoE router: bias built in, no patch)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "moe_balance/tiny_sft",
                "--model_name_or_path",
                str(dst),
                "--max_steps",
                "2",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["metrics"]["moe/bias_norm"]["last"] > 0


# --- the recipes, resume, MaxVio_global -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moe_balance/tiny_sft", "moe_balance/tiny_grpo"])
def test_moe_recipes_run_and_log(name, tmp_path):
    from posttrain.cli import main

    assert main(["train", name, "--max_steps", "2", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    m = summary["metrics"]
    for key in (
        "moe/maxvio",
        "moe/maxvio_max",
        "moe/load_entropy",
        "moe/bias_norm",
        "moe/layer0/maxvio",
        "moe/layer1/load_entropy",
        "moe/layer1/bias_norm",
    ):
        assert key in m, key
    # sign steps of u = 1e-3 on 2 layers x 8 experts: after n steps the norm is at most n u sqrt(16)
    assert 0 < m["moe/bias_norm"]["first"] <= 1e-3 * 4 + 1e-9 and m["moe/bias_norm"]["last"] <= 2 * 1e-3 * 4 + 1e-9


def test_grpo_counts_only_the_training_forwards(tmp_path):
    trainer, logs = _run(load_recipe("moe_balance/tiny_grpo", {"max_steps": 2, "output_dir": str(tmp_path)}))
    # num_tokens: cumulative prompt + completion tokens of the training forwards; generation would add many more
    seen = [0] + [h["num_tokens"] for h in logs]
    for h, before, after in zip(logs, seen, seen[1:]):
        assert h["moe/assignments"] == 2 * (after - before)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_resume_restores_biases_and_experts_exactly(arch, tmp_path):
    from posttrain.recipes.train import build_trainer

    values = dict(
        model_name_or_path=f"tiny:{arch}",
        moe_balance="aux_free",
        moe_bias_rate=1e-2,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        moe_bias_on_softmax=arch == "qwen3_moe",
    )

    def run(out, resume=None):
        trainer = build_trainer(recipe_of(out, **values))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    full, losses = run(tmp_path / "full")
    # why runtime.ConvertedCheckpointLoad exists: the checkpoint stores the experts in the hub's per-expert layout,
    # which a plain load_state_dict (transformers' Trainer resume) does not match
    from safetensors import safe_open

    with safe_open(str(tmp_path / "full" / "checkpoint-2" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert any(".experts.0." in k for k in saved) and not any(".experts.0." in k for k in full.model.state_dict())
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed, again = run(tmp_path / "cut", str(tmp_path / "cut" / "checkpoint-2"))
    assert again[3] == losses[3] and again[4] == losses[4]
    for x, y in zip(expert_biases(full.model), expert_biases(resumed.model)):
        assert torch.equal(x, y) and float(x.abs().sum()) > 0
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:  # experts included: transformers alone would leave them at their initial weights (runtime.py)
        assert torch.equal(a[k], b[k]), k


def test_eval_harness_loads_patched_router_biases(tmp_path):
    # a stock from_pretrained drops the biases of patched Qwen routers; the eval harness patches and restores them
    from transformers import AutoModelForCausalLM

    from posttrain.evals.common import load_checkpoint
    from posttrain.recipes.train import build_trainer

    trainer = build_trainer(
        recipe_of(
            tmp_path,
            model_name_or_path="tiny:qwen3_moe",
            moe_balance="aux_free",
            moe_bias_rate=1e-2,
            moe_bias_on_softmax=True,
            max_steps=2,
        )
    )
    trainer.train()
    trainer.save_model(str(tmp_path))
    trained = [b.clone() for b in expert_biases(trainer.model)]
    assert all(float(b.abs().sum()) > 0 for b in trained)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(k.endswith("e_score_correction_bias") for k in stock.state_dict())
    model, _, _ = load_checkpoint(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(trained, expert_biases(model), strict=True))
    plain, _, _ = load_checkpoint("tiny:qwen3_moe")  # an unpatched model stays unpatched
    assert not any(k.endswith("e_score_correction_bias") for k in plain.state_dict())


def test_maxvio_global(deepseek):
    from posttrain.evals.moe_load import maxvio_global
    from posttrain.recipes.tiny import build_tokenizer

    tok = build_tokenizer()
    texts = ["What is 2 + 3? The answer is 5.", "The cat and the dog", "red blue green", "hello world " * 5]
    result = maxvio_global(deepseek, tok, texts, batch_size=3)
    n_tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    assert result["tokens"] == n_tokens and all(sum(c) == 2 * n_tokens for c in result["loads"].values())
    loads = torch.tensor(list(result["loads"].values()))
    assert result["maxvio_global"] == pytest.approx(max_violation(loads))
    assert set(result["per_layer"]) == {"layer0", "layer1"} and 0 < result["maxvio_global"] < 3
    assert deepseek.training  # restored
    # a huge bias on expert 0 sends every token there: MaxVio = E / K - 1 = 3 in every layer
    for b in expert_biases(deepseek):
        b[0] = 10.0
    forced = maxvio_global(deepseek, tok, texts)
    assert forced["maxvio_global"] == pytest.approx(3.0) and forced["maxvio_global_max"] == pytest.approx(3.0)


# --- wiring: the bias update's timing through a real Trainer, every rule ------------------------------------------


@pytest.mark.parametrize("rule", ["sign", "proportional", "decaying"])
def test_bias_updates_after_each_optimizer_step_with_the_steps_own_loads(rule, tmp_path, monkeypatch):
    # Through TRL's SFTTrainer: after optimizer step n (n = 0, 1, 2) the biases must be the pure update applied to
    # the loads of that step's forwards with step=n. The decaying rule's step size depends on n, so an update hooked
    # one event early or late (before the optimizer step, at the next step's start) gives other biases.
    import posttrain.trainers.moe_balance as moe_mod
    from posttrain.recipes.train import build_trainer

    seen = []
    real = moe_mod.apply_bias_update

    def recording(counter, *args, **kwargs):
        seen.append([c.clone() for c in counter.counts])
        return real(counter, *args, **kwargs)

    monkeypatch.setattr(moe_mod, "apply_bias_update", recording)
    rate, power, n0 = 1e-2, 1.0, 0.5
    recipe = recipe_of(
        tmp_path,
        model_name_or_path="tiny:deepseek_v3",
        max_steps=3,
        moe_balance="aux_free",
        moe_bias_rate=rate,
        moe_bias_rule=rule,
        moe_bias_decay_power=power,
        moe_bias_decay_steps=n0,
    )
    trainer = build_trainer(recipe)
    routers = find_routers(trainer.model)
    want = [torch.zeros_like(b) for b in expert_biases(routers)]
    trainer.train()
    assert len(seen) == 3
    for n, loads in enumerate(seen):
        assert all(int(c.sum()) > 0 for c in loads)
        want = [
            update_expert_bias(b, c, rate, rule, step=n, decay_power=power, decay_steps=n0) for b, c in zip(want, loads)
        ]
    for got, expected in zip(expert_biases(routers), want):
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)
    # the logged MaxVio_batch of each step, by hand from that step's loads: mean over layers of (max - mean) / mean
    logged = [h["moe/maxvio"] for h in trainer.state.log_history if "moe/maxvio" in h]
    by_hand = [
        sum(float((c.max() - c.float().mean()) / c.float().mean()) for c in loads) / len(loads) for loads in seen
    ]
    assert logged == pytest.approx(by_hand, rel=1e-5)
