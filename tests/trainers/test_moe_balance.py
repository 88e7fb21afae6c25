"""ALF-LB (aux-loss-free MoE balancing): spec §5.7 worked example, property tests of the pure math, agreement
with transformers' DeepSeek-V3 router, token counting under gradient checkpointing, the callback, the Qwen3-MoE
patch and the 2-rank all-reduce."""

import math
import os
import socket

import pytest
import torch

from posttrain.trainers.moe_balance import (
    BIAS_NAME,
    MoEBalanceCallback,
    MoEBalanceConfig,
    RoutingCounter,
    apply_bias_update,
    aux_balance_loss,
    bias_step_size,
    biased_topk,
    expert_biases,
    expert_counts,
    find_routers,
    install_expert_bias,
    load_entropy,
    max_violation,
    moe_metrics,
    update_expert_bias,
)

torch.set_num_threads(1)

# --- spec §5.7: E = 4, K = 2, T = 4, sigmoid scores, u = 1e-3 ------------------------------------------------
S = torch.tensor([[.90, .80, .10, .20], [.85, .70, .30, .60], [.60, .20, .10, .95], [.95, .40, .50, .30]])


def sorted_pairs(indices, weights):
    """Per-token (index, weight) pairs sorted by index: compares selections regardless of order."""
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def test_spec_example_zero_bias():
    idx, w = biased_topk(S, torch.zeros(4), 2)
    assert idx.tolist() == [[0, 1], [0, 1], [3, 0], [0, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.5294, 0.4706], [0.5484, 0.4516], [0.6129, 0.3871],
                                                [0.6552, 0.3448]]), atol=1e-4, rtol=0)
    counts = expert_counts(idx, 4)
    assert counts.tolist() == [4, 2, 1, 1]
    new = update_expert_bias(torch.zeros(4), counts, 1e-3)
    torch.testing.assert_close(new, torch.tensor([-0.001, 0.0, 0.001, 0.001]), atol=1e-9, rtol=0)
    assert new[1] == 0  # sign(0) = 0: a balanced expert keeps its bias


def test_spec_example_shifted_bias():
    bias = torch.tensor([-0.5, 0.0, 0.0, 0.0])
    idx, w = biased_topk(S, bias, 2)
    assert idx.tolist() == [[1, 0], [1, 3], [3, 1], [2, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.4706, 0.5294], [0.5385, 0.4615], [0.8261, 0.1739],
                                                [0.3448, 0.6552]]), atol=1e-4, rtol=0)
    counts = expert_counts(idx, 4)
    assert counts.tolist() == [2, 3, 1, 2]
    new = update_expert_bias(bias, counts, 1e-3)
    torch.testing.assert_close(new - bias, torch.tensor([0.0, -0.001, 0.001, 0.0]), atol=1e-7, rtol=0)


def test_spec_example_metrics():
    counts = torch.tensor([4, 2, 1, 1])
    assert max_violation(counts) == pytest.approx(1.0)  # (4 - 2) / 2
    assert load_entropy(counts) == pytest.approx(-(0.5 * math.log(0.5) + 0.25 * math.log(0.25)
                                                   + 2 * 0.125 * math.log(0.125)))
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
    torch.testing.assert_close(idx.sort(-1).values, (scores + bias).topk(3, dim=-1).indices.sort(-1).values,
                               rtol=0, atol=0)
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


def test_aux_balance_loss():
    # uniform normalised affinities: P_i = 1/E, sum_i f_i = E -> loss = alpha whatever the selection
    scores = torch.full((4, 4), 0.5)
    assert aux_balance_loss(scores, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), 4).item() == pytest.approx(1e-3)
    # collapsed routing onto experts 0, 1 that also get the affinity: f = [2, 2, 0, 0], P = [.45, .45, .05, .05]
    scores = torch.tensor([[.9, .9, .1, .1]] * 4, requires_grad=True)
    loss = aux_balance_loss(scores, torch.tensor([[0, 1]] * 4), 4, alpha=1e-3)
    assert loss.item() == pytest.approx(1.8e-3)
    loss.backward()  # descent lowers the overloaded experts' affinity and raises the others'
    assert (scores.grad[:, :2] > 0).all() and (scores.grad[:, 2:] < 0).all()
    # pads are left out
    mask = torch.tensor([1, 1, 0, 0])
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [0, 1]])
    assert aux_balance_loss(torch.full((4, 4), 0.5), idx, 4, mask=mask).item() == pytest.approx(1e-3)


def test_config_validation():
    MoEBalanceConfig()
    for bad in (dict(moe_balance="x"), dict(moe_bias_rule="x"), dict(moe_bias_rate=-1.0),
                dict(moe_bias_decay_steps=0.0), dict(moe_bias_rate=float("nan"))):
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
        idx, w = biased_topk(logits.sigmoid(), router.e_score_correction_bias, router.top_k,
                             n_group=router.num_group, topk_group=router.topk_group,
                             norm_topk_prob=router.norm_topk_prob, scaling=router.routed_scaling_factor)
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
    for step in range(3):
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
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, learning_rate=1e-3, disable_tqdm=True)
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

    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1)
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    routers = install_expert_bias(model)
    assert len(routers) == 2 and all(type(m).__name__ == "Qwen3MoeTopKRouter" for _, m in routers)
    assert [k for k in model.state_dict() if k.endswith(BIAS_NAME)] == [
        "model.layers.0.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.gate.e_score_correction_bias"]
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
    torch.save({"bias": model["r"].e_score_correction_bias.clone(), "counts": reduced[0]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_all_reduce_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["counts"].tolist() == r1["counts"].tolist() == [3, 0, 2, 3]
    # c_bar = 2: each rank alone would move expert 0 differently; the reduced loads give one answer
    torch.testing.assert_close(r0["bias"], torch.tensor([-1e-3, 1e-3, 0.0, -1e-3]))
    assert torch.equal(r0["bias"], r1["bias"])
