"""THR / NTHR pure math: a worked example and property tests.

The worked example (G = 4, two tokens per sample, V* = {0, 1, 2}, d = 2) was computed with numpy from the
equations in the docstring of ``posttrain/trainers/thr_grpo.py``: NTHR's (anchor matrix, influence score, threshold,
eta = 2|0.5 - rho|) as given in the NTHR paper (Deng et al., "On the Effect of Negative Gradient in Group Relative
Deep Reinforcement Optimization", NeurIPS 2025), TRL 1.16's group advantages, and THR's reweighting, which is a
reconstruction (THR, arXiv 2510.03669: only the abstract and the reviews were read), so those expected values check
this module's rule, not the paper's.
"""

import json as _json
import math
import subprocess as _subprocess

import pytest
import torch

from posttrain.recipes.config import load_recipe as _load_recipe
from posttrain.recipes.train import build_trainer as _build_trainer
from posttrain.trainers.advantages import grpo_group_advantages
from posttrain.trainers.thr_grpo import (
    THRGRPOConfig,
    anchor_matrix,
    nthr_advantages,
    prediction_errors,
    slice_to_generated_vocab,
    thr_advantages,
    token_influence,
)

# --- worked example: G = 4, two tokens per sample, V* = {0, 1, 2}, d = 2 ---------------------------------
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.0])
TOKENS = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 2]])
Q = torch.tensor(
    [
        [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]],
        [[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]],
        [[0.6, 0.2, 0.2], [0.3, 0.4, 0.3]],
        [[0.3, 0.3, 0.4], [0.2, 0.2, 0.6]],
    ]
)
H = torch.tensor(
    [
        [[1.0, 0.0], [0.5, 0.5]],
        [[1.0, 0.2], [0.0, 1.0]],
        [[0.9, 0.1], [0.4, 0.6]],
        [[-1.0, 0.5], [0.0, -1.0]],
    ]
)
MASK = torch.ones(4, 2, dtype=torch.bool)
CORRECT = REWARDS >= 1.0


def worked_influence():
    return token_influence(H, Q, TOKENS, MASK, CORRECT, beta=1.0)


def close(actual, expected, places=4):
    torch.testing.assert_close(
        actual.float(), torch.tensor(expected, dtype=torch.float32), atol=0.6 * 10**-places, rtol=0
    )


def test_anchor_matrix_matches_the_worked_example():
    close(anchor_matrix(H, Q, TOKENS, MASK, CORRECT), [[0.8, -0.1], [-0.45, -0.11], [-0.35, 0.21]])


def test_influence_and_threshold_match_the_worked_example():
    s, tau = worked_influence()
    close(s, [[0.4900, -0.1470], [0.5932, 0.0950], [0.4260, -0.2214], [0.4095, -0.1260]])
    close(s[:2].mean(-1), [0.1715, 0.3441])
    assert abs(float(tau) - 0.1715) < 0.6e-4
    s, tau_half = token_influence(H, Q, TOKENS, MASK, CORRECT, beta=0.5)
    assert abs(float(tau_half) - 0.5 * 0.17155) < 1e-4


def test_grpo_advantages_match_the_worked_example_and_trl():
    A = grpo_group_advantages(REWARDS)
    close(A, [0.8659, 0.8659, -0.8659, -0.8659])
    r = torch.tensor([0.3, 1.2, -0.5, 2.0, 0.0])
    torch.testing.assert_close(grpo_group_advantages(r), (r - r.mean()) / (r.std() + 1e-4))


def test_nthr_matches_the_worked_example():
    s, tau = worked_influence()
    out = nthr_advantages(grpo_group_advantages(REWARDS), s, tau, CORRECT, MASK)
    close(out, [[0.8659, 0.8659], [0.8659, 0.8659], [-0.0, -0.8659], [-0.0, -0.8659]])


def test_nthr_eta_for_an_unbalanced_group():
    # Same tokens, but sample 3 is also counted correct: rho = 3/4 -> eta = 0.5 on sample 2's selected tokens.
    correct = torch.tensor([True, True, False, True])
    s, tau = token_influence(H, Q, TOKENS, MASK, correct)
    A = torch.tensor([1.0, 1.0, -3.0, 1.0])
    out = nthr_advantages(A, s, tau, correct, MASK)
    selected = s[2] > tau
    assert selected.any()
    torch.testing.assert_close(out[2], torch.where(selected, -1.5 * torch.ones(2), -3.0 * torch.ones(2)))
    torch.testing.assert_close(out[[0, 1, 3]], torch.ones(3, 2))


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.2, [[1.0391, 0.8659], [1.0391, 0.8659], [-0.6927, -1.0391], [-0.6927, -0.8659]]),
        (-0.2, [[0.6927, 0.8659], [0.6927, 0.8659], [-1.0391, -0.6927], [-1.0391, -0.8659]]),
    ],
)
def test_thr_reweight_matches_the_worked_example(p, expected):
    s, tau = worked_influence()
    close(thr_advantages(grpo_group_advantages(REWARDS), s, tau, p, MASK, mode="reweight"), expected)


def test_thr_dominant_only_on_the_worked_example():
    s, tau = worked_influence()
    A = grpo_group_advantages(REWARDS)
    out = thr_advantages(A, s, tau, 0.2, MASK, mode="dominant_only")
    # dominant: all token-0s and s2's token 1; the rest are zeroed
    close(out, [[1.0391, 0.0], [1.0391, 0.0], [-0.6927, -1.0391], [-0.6927, 0.0]])


def test_unknown_mode_is_refused():
    s, tau = worked_influence()
    with pytest.raises(ValueError, match="reweight, dominant_only"):
        thr_advantages(grpo_group_advantages(REWARDS), s, tau, 0.2, MASK, mode="nthr")


# --- property tests on random groups --------------------------------------------------------------------


def random_group(seed, G=6, T=5, V=9, d=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(G, T, V, generator=gen, dtype=dtype)
    probs_full = logits.softmax(-1)
    token_ids = torch.randint(0, V, (G, T), generator=gen)
    lengths = torch.randint(1, T + 1, (G,), generator=gen)
    mask = torch.arange(T)[None] < lengths[:, None]
    token_ids = torch.where(mask, token_ids, torch.full_like(token_ids, -100))  # padding ids must not matter
    hidden = torch.randn(G, T, d, generator=gen, dtype=dtype)
    rewards = torch.zeros(G, dtype=dtype)
    rewards[torch.randperm(G, generator=gen)[: int(torch.randint(1, G, (1,), generator=gen))]] = 1.0
    return hidden, probs_full, token_ids, mask, rewards


def influence_of(hidden, probs_full, token_ids, mask, rewards, beta=1.0):
    probs, pos, vocab = slice_to_generated_vocab(probs_full, token_ids, mask)
    return token_influence(hidden, probs, pos, mask, rewards >= 1.0, beta=beta)


@pytest.mark.parametrize("seed", range(5))
def test_slice_to_generated_vocab_round_trip(seed):
    hidden, probs_full, token_ids, mask, rewards = random_group(seed)
    probs, pos, vocab = slice_to_generated_vocab(probs_full, token_ids, mask)
    assert torch.equal(vocab, torch.unique(token_ids[mask]))
    assert probs.shape == (*token_ids.shape, vocab.numel())
    assert torch.equal(vocab[pos][mask], token_ids[mask])
    assert torch.equal(pos[~mask], torch.zeros_like(pos[~mask]))
    torch.testing.assert_close(
        probs.gather(-1, pos[..., None])[..., 0][mask],
        probs_full.gather(-1, token_ids.clamp_min(0)[..., None])[..., 0][mask],
    )
    torch.testing.assert_close(probs, probs_full[..., vocab])  # sliced, not renormalised
    assert (probs.sum(-1) < 1 + 1e-12).all()


@pytest.mark.parametrize("seed", range(5))
def test_influence_equals_the_naive_double_sum(seed):
    hidden, probs_full, token_ids, mask, rewards = random_group(seed)
    probs, pos, vocab = slice_to_generated_vocab(probs_full, token_ids, mask)
    correct = rewards >= 1.0
    s, tau = token_influence(hidden, probs, pos, mask, correct)
    G, T = token_ids.shape
    K = vocab.numel()
    naive = torch.zeros(G, T, dtype=torch.float64)
    for j in range(G):
        for kp in range(T):
            if not mask[j, kp]:
                continue
            g_j = -probs[j, kp].clone()
            g_j[pos[j, kp]] += 1
            for i in range(G):
                if not correct[i]:
                    continue
                for k in range(T):
                    if not mask[i, k]:
                        continue
                    g_i = -probs[i, k].clone()
                    g_i[pos[i, k]] += 1
                    naive[j, kp] += torch.dot(g_i, g_j) * torch.dot(hidden[i, k], hidden[j, kp])
    assert K == vocab.numel()
    torch.testing.assert_close(s, naive)
    anchors = [naive[i][mask[i]].mean() for i in range(G) if correct[i]]
    torch.testing.assert_close(tau, min(anchors))
    assert s.dtype == torch.float64


def test_influence_is_float32_by_default_and_ignores_padding_content():
    hidden, probs_full, token_ids, mask, rewards = random_group(11, dtype=torch.float32)
    s, tau = influence_of(hidden, probs_full, token_ids, mask, rewards)
    assert s.dtype == torch.float32 and tau.dtype == torch.float32
    garbage_h = torch.where(mask[..., None], hidden, torch.full_like(hidden, 1e3))
    garbage_q = torch.where(mask[..., None], probs_full, torch.rand_like(probs_full))
    s2, tau2 = influence_of(garbage_h, garbage_q, token_ids, mask, rewards)
    torch.testing.assert_close(s2, s)
    torch.testing.assert_close(tau2, tau)
    assert (s[~mask] == 0).all()


@pytest.mark.parametrize("mode", ["reweight", "dominant_only"])
@pytest.mark.parametrize("seed", range(4))
def test_p_zero_and_sign_symmetry(seed, mode):
    hidden, probs_full, token_ids, mask, rewards = random_group(seed)
    s, tau = influence_of(hidden, probs_full, token_ids, mask, rewards)
    A = grpo_group_advantages(rewards)
    plain = A[:, None] * mask
    dominant = (s.abs() > tau) & mask
    assert dominant.any() and (mask & ~dominant).any(), "the random group should have both kinds of tokens"
    zero = thr_advantages(A, s, tau, 0.0, mask, mode=mode)
    if mode == "reweight":
        torch.testing.assert_close(zero, plain)  # p = 0 is GRPO
    else:
        torch.testing.assert_close(zero, torch.where(dominant, plain, torch.zeros_like(plain)))
    p = 0.3
    plus, minus = (thr_advantages(A, s, tau, q, mask, mode=mode) for q in (p, -p))
    # factors (1 + p sgn THR) and (1 - p sgn THR) swap; their mean is the p = 0 result
    torch.testing.assert_close((plus + minus) / 2, zero)
    sgn = torch.sign(A[:, None] * s)
    torch.testing.assert_close(plus, torch.where(dominant, plain * (1 + p * sgn), zero))
    torch.testing.assert_close(minus, torch.where(dominant, plain * (1 - p * sgn), zero))
    # exploitation: positive-THR dominant tokens get larger |A|, negative-THR ones smaller
    up = dominant & (sgn > 0)
    assert up.any()
    assert (plus[up].abs() > minus[up].abs()).all()
    assert (plus[~mask] == 0).all() and (minus[~mask] == 0).all()


@pytest.mark.parametrize("n_correct", [0, 6])
@pytest.mark.parametrize("seed", range(3))
def test_all_correct_or_all_wrong_groups_keep_grpo_advantages(seed, n_correct):
    hidden, probs_full, token_ids, mask, _ = random_group(seed)
    G = token_ids.shape[0]
    correct = torch.arange(G) < n_correct
    # non-binary rewards, so the advantages are not all zero even when every sample is "correct"
    rewards = torch.linspace(0.0, 0.9, G) + correct.double() * 1.0
    A = grpo_group_advantages(rewards)
    assert A.abs().max() > 0.5
    probs, pos, _ = slice_to_generated_vocab(probs_full, token_ids, mask)
    s, tau = token_influence(hidden, probs, pos, mask, correct)
    assert math.isinf(float(tau)) and float(tau) > 0
    assert (s == 0).all()
    plain = A[:, None] * mask
    for mode in ("reweight", "dominant_only"):
        torch.testing.assert_close(thr_advantages(A, s, tau, 0.5, mask, mode=mode), plain)
    torch.testing.assert_close(nthr_advantages(A, s, tau, correct, mask), plain)


@pytest.mark.parametrize("seed", range(4))
def test_nthr_properties(seed):
    hidden, probs_full, token_ids, mask, rewards = random_group(seed)
    s, tau = influence_of(hidden, probs_full, token_ids, mask, rewards)
    correct = rewards >= 1.0
    A = grpo_group_advantages(rewards)
    out = nthr_advantages(A, s, tau, correct, mask)
    rho = correct.double().mean()
    eta = 2 * abs(0.5 - rho)
    selected = (~correct)[:, None] & (s > tau) & mask
    expected = torch.where(selected, eta * A[:, None], A[:, None]) * mask
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[correct], (A[:, None] * mask)[correct])  # correct samples untouched
    # beta = -inf selects every token of every incorrect sample
    s_all, tau_all = influence_of(hidden, probs_full, token_ids, mask, rewards, beta=-math.inf)
    assert float(tau_all) == -math.inf
    out_all = nthr_advantages(A, s_all, tau_all, correct, mask)
    torch.testing.assert_close(out_all[~correct], (eta * A[:, None] * mask)[~correct])


def test_prediction_errors_sum_to_one_minus_mass():
    hidden, probs_full, token_ids, mask, rewards = random_group(3)
    probs, pos, _ = slice_to_generated_vocab(probs_full, token_ids, mask)
    g = prediction_errors(probs, pos, mask)
    torch.testing.assert_close(g.sum(-1)[mask], 1 - probs.sum(-1)[mask])
    assert (g[~mask] == 0).all()


# --- config ---------------------------------------------------------------------------------------------


def make_config(tmp_path, **kw):
    return THRGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], **kw)


def test_config_defaults_and_sequence_token(tmp_path):
    cfg = make_config(tmp_path, importance_sampling_level="sequence_token", thr_p=-0.5, thr_mode="dominant_only")
    assert cfg.importance_sampling_level == "sequence_token"
    assert (cfg.thr_p, cfg.thr_mode, cfg.thr_beta, cfg.correct_threshold) == (-0.5, "dominant_only", 1.0, 1.0)
    assert make_config(tmp_path).thr_p == 0.0 and make_config(tmp_path).thr_mode == "reweight"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"thr_mode": "thr"}, "reweight, dominant_only, nthr"),
        ({"importance_sampling_level": "seq"}, "token, sequence, sequence_token"),
        ({"thr_p": float("nan")}, "thr_p"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **kw)


# ------------------------------------------------------------------------------- the trainer on real batches


def _loss_and_grads(name, tmp_path, **overrides):
    trainer = _build_trainer(
        _load_recipe(name, {"output_dir": str(tmp_path / name.split("/")[0]), "max_steps": 1, **overrides})
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we do not run
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(1234)  # same sampling for both trainers
    trainer.model.train()
    inputs = trainer._prepare_inputs(batch)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return (
        trainer,
        inputs,
        loss.item(),
        {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
    )


def test_thr_p0_gives_stock_grpo_loss_and_gradients(tmp_path):
    _, grpo_inputs, grpo_loss, grpo_grads = _loss_and_grads("grpo/tiny", tmp_path, reward_funcs=["numeric_match"])
    thr, thr_inputs, thr_loss, thr_grads = _loss_and_grads("thr_grpo/tiny", tmp_path, thr_p=0.0)
    assert torch.equal(grpo_inputs["completion_ids"], thr_inputs["completion_ids"])  # the same batch
    assert thr_inputs["advantages"].dim() == 2  # the THR path ran (per-token advantages), mixed group or not
    assert thr_loss == pytest.approx(grpo_loss, abs=1e-7)
    assert grpo_grads.keys() == thr_grads.keys()
    for name in grpo_grads:
        torch.testing.assert_close(thr_grads[name], grpo_grads[name], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["reweight", "dominant_only", "nthr"])
def test_trainer_token_advantages_on_a_mixed_group(mode, tmp_path):
    p = 0.5
    trainer = _build_trainer(
        _load_recipe(
            "thr_grpo/tiny",
            {
                "output_dir": str(tmp_path),
                "thr_p": p,
                "thr_mode": mode,
                "num_generations": 8,
                "per_device_train_batch_size": 8,
            },
        )
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (8, 7), generator=g)
    mask = (torch.arange(7)[None] < torch.randint(3, 8, (8,), generator=g)[:, None]).long()
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0])
    plain = grpo_group_advantages(rewards)
    out = {
        "prompt_ids": torch.randint(4, 500, (8, 5), generator=g),
        "prompt_mask": torch.ones(8, 5, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": plain,
    }
    adv = trainer.thr_token_advantages(out, rewards)
    valid = mask.bool()
    assert adv.shape == ids.shape and (adv[~valid] == 0).all()
    factors = (adv / plain[:, None])[valid]
    # nthr: eta = 2|0.5 - rho| with rho = 3/8, only on selected tokens of incorrect samples
    allowed = {
        "reweight": (1.0, 1 + p, 1 - p),
        "dominant_only": (0.0, 1 + p, 1 - p),
        "nthr": (1.0, 2 * abs(0.5 - 3 / 8)),
    }[mode]
    assert all(min(abs(f - c) for c in allowed) < 1e-5 for f in factors.tolist()), factors
    if mode == "nthr":
        assert (factors[(rewards[:, None].expand_as(valid) == 1)[valid]] == 1).all()
    else:
        assert (factors != 1).any()  # some token was dominant and moved
    assert trainer._metrics["train"]["thr/mixed_groups"] == [1.0]


def test_gspo_token_ratio_has_the_sequence_value_and_the_token_gradient(tmp_path):
    trainer = _build_trainer(
        _load_recipe("thr_grpo/tiny", {"output_dir": str(tmp_path), "importance_sampling_level": "sequence_token"})
    )
    ids = torch.randint(4, 500, (2, 9))
    mask = torch.tensor([[1] * 6 + [0] * 3, [1] * 4 + [0] * 5])
    plain, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 6)
    old = plain.detach() + 0.1 * torch.randn(plain.shape)
    inputs = {"old_per_token_logps": old}
    trainer._gspo_token = (inputs, mask[:, 3:])
    again, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 6)
    assert trainer._gspo_token is None and torch.equal(again, plain)  # the log-probs themselves are untouched
    assert inputs["sampling_per_token_logps"] is old  # the off-policy mask keeps the true old log-probs
    ratio = again - inputs["old_per_token_logps"]  # what TRL's token-level branch forms
    m = mask[:, 3:].float()
    seq = ((plain - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
    torch.testing.assert_close(ratio[m.bool()], seq.expand_as(ratio)[m.bool()])
    g1 = torch.autograd.grad((plain * m).sum(), next(trainer.model.parameters()), retain_graph=True)[0]
    g2 = torch.autograd.grad((ratio * m).sum(), next(trainer.model.parameters()))[0]
    torch.testing.assert_close(g1, g2)


@pytest.mark.slow
def test_a_group_split_across_two_processes_gets_the_same_advantages(tmp_path):
    from support import BIN, ROOT, free_port

    results = {}
    for world in (1, 2):
        path = tmp_path / f"w{world}.json"
        launch = (
            ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
            if world == 2
            else ["--num_processes", "1"]
        )
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            *launch,
            str(ROOT / "tests" / "helpers" / "thr_split_group.py"),
            str(path),
        ]
        proc = _subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-5000:]
        results[world] = _json.loads(path.read_text())
    assert results[2]["world"] == 2
    one, two = torch.tensor(results[1]["advantages"]), torch.tensor(results[2]["advantages"])
    assert results[1]["metrics"]["thr/mixed_groups"] == [3.0]  # the middle group is split across the two ranks
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(one, one[:, :1].expand_as(one) * (one != 0))  # THR actually reweighted something


# --------------------------------------- fidelity of the trainer's paths: GSPO-token, masks, old-policy forward


def _gspo_batch(trainer, seed=0, B=4, P=5, T=7):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T)[None] < torch.randint(3, T + 1, (B,), generator=g)[:, None]).long()
    return {
        "prompt_ids": torch.randint(4, 500, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(4, 500, (B, T), generator=g),
        "completion_mask": mask,
        "advantages": torch.zeros(B, T),
    }, g


@pytest.mark.parametrize("bias_correction", [False, True])
def test_gspo_token_kl_is_taken_at_the_current_policy(bias_correction, tmp_path):
    # beta > 0 and num_iterations = 2 (old log-probs exist): the KL term's value and gradient must be those of the
    # current policy's log-probs (TRL's k3 estimator), not of the GSPO-token-shifted ones. Advantages are 0, so the
    # loss is the KL term alone. TRL's bias correction multiplies it by the objective's importance weight (for its
    # "sequence" level the sequence ratio), here GSPO-token's weight sg[s_i] pi_t / sg[pi_t].
    beta = 0.5
    trainer = _build_trainer(
        _load_recipe(
            "thr_grpo/tiny",
            {
                "output_dir": str(tmp_path),
                "importance_sampling_level": "sequence_token",
                "beta": beta,
                "num_iterations": 2,
                "loss_type": "grpo",
                "use_bias_correction_kl": bias_correction,
            },
        )
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs, g = _gspo_batch(trainer)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].size(1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, T)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(logps.shape, generator=g)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    loss = trainer._compute_loss(trainer.model, inputs)
    got = torch.autograd.grad(loss, params, allow_unused=True)

    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, T)
    d = inputs["ref_per_token_logps"] - logps
    m = inputs["completion_mask"].float()
    per_token_kl = torch.exp(d) - d - 1
    if bias_correction:
        seq = ((logps.detach() - inputs["old_per_token_logps"]) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
        per_token_kl = per_token_kl * torch.exp(seq + logps - logps.detach())
    direct = beta * ((per_token_kl * m).sum(-1) / m.sum(-1)).mean()
    want = torch.autograd.grad(direct, params, allow_unused=True)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5, abs=1e-7), "KL value at the shifted log-probs"
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4, msg="KL gradient at the shifted log-probs")
    logged = (per_token_kl.detach() * m).sum() / m.sum()  # TRL logs the token mean of the (corrected) KL
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(logged.item(), rel=1e-5)


def _mixed_out(seed=0, G=8, T=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 500, (G, T), generator=g)
    mask = (torch.arange(T)[None] < torch.randint(4, T + 1, (G,), generator=g)[:, None]).long()
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0])[:G]
    out = {
        "prompt_ids": torch.randint(4, 500, (G, 5), generator=g),
        "prompt_mask": torch.ones(G, 5, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": grpo_group_advantages(rewards),
    }
    return out, rewards


def _thr_trainer(tmp_path, **kw):
    return _build_trainer(
        _load_recipe(
            "thr_grpo/tiny",
            {"output_dir": str(tmp_path), "thr_p": 0.5, "num_generations": 8, "per_device_train_batch_size": 8, **kw},
        )
    )


def test_a_mixed_group_with_every_token_masked_keeps_grpo_advantages(tmp_path):
    # mask_truncated_completions can zero every completion token of a mixed group: V* is empty.
    trainer = _thr_trainer(tmp_path)
    out, rewards = _mixed_out()
    out["completion_mask"] = torch.zeros_like(out["completion_mask"])
    adv = trainer.thr_token_advantages(out, rewards)
    assert adv.shape == out["completion_ids"].shape and (adv == 0).all()
    s, tau = token_influence(
        torch.randn(8, 7, 4), torch.zeros(8, 7, 0), torch.zeros(8, 7, dtype=torch.long), torch.zeros(8, 7), rewards >= 1
    )
    assert (s == 0).all() and float(tau) == math.inf


def test_tool_tokens_stay_out_of_the_influence(tmp_path):
    # Tool-result tokens (tool_mask = 0) are not the policy's: they must not enter V*, M+, tau or s. Put them at the
    # end of some completions so that (causal attention) dropping them from the completion mask instead changes no
    # hidden state: both ways must give the same advantages.
    trainer = _thr_trainer(tmp_path)
    out, rewards = _mixed_out()
    tool = torch.ones_like(out["completion_mask"])
    tool[[0, 2, 3, 6], 2:] = 0  # includes tokens of correct samples (M+, tau) and of incorrect ones
    with_tool = trainer.thr_token_advantages({**out, "tool_mask": tool}, rewards)
    dropped = trainer.thr_token_advantages({**out, "completion_mask": out["completion_mask"] * tool}, rewards)
    torch.testing.assert_close(with_tool, dropped, msg="tool tokens changed the THR advantages")
    assert (with_tool[tool == 0] == 0).all()


def test_gspo_token_mean_skips_tool_tokens(tmp_path, monkeypatch):
    import posttrain.trainers.thr_grpo as thr

    trainer = _build_trainer(
        _load_recipe(
            "thr_grpo/tiny",
            {
                "output_dir": str(tmp_path),
                "importance_sampling_level": "sequence_token",
                "num_iterations": 2,
                "loss_type": "grpo",
            },
        )
    )
    trainer.current_gradient_accumulation_steps = 1
    inputs, g = _gspo_batch(trainer)
    inputs["tool_mask"] = torch.ones_like(inputs["completion_mask"])
    inputs["tool_mask"][:, 1:3] = 0
    inputs["old_per_token_logps"] = torch.randn(inputs["completion_ids"].shape, generator=g)
    seen, orig = [], thr.gspo_token_old_logps
    monkeypatch.setattr(thr, "gspo_token_old_logps", lambda lp, old, mask: seen.append(mask) or orig(lp, old, mask))
    trainer._compute_loss(trainer.model, inputs)
    assert torch.equal(seen[0], inputs["completion_mask"] * inputs["tool_mask"])


def test_p0_reweight_skips_the_old_policy_forward(tmp_path, monkeypatch):
    trainer = _thr_trainer(tmp_path, thr_p=0.0, thr_mode="reweight")
    out, rewards = _mixed_out()
    calls, forward = [], trainer._old_policy_hidden_and_lse
    monkeypatch.setattr(trainer, "_old_policy_hidden_and_lse", lambda o: calls.append(1) or forward(o))
    skipped = trainer.thr_token_advantages(out, rewards)
    assert calls == [], "the old-policy forward ran although p = 0 with reweight cannot change the advantages"
    monkeypatch.setattr(trainer, "_thr_is_neutral", lambda: False)  # force the full computation
    full = trainer.thr_token_advantages(out, rewards)
    assert calls == [1]
    assert torch.equal(skipped, full)
    assert torch.equal(skipped, out["advantages"][:, None] * out["completion_mask"])


def _postprocessed_trainer(tmp_path, softcap=2.0, scale=0.5, temperature=0.7):
    """The tiny Qwen3 with Gemma-2 style final softcapping and a Cohere style logit scale in its config: TRL's fused
    log-prob head reads both (Qwen3's own forward ignores them, so the test can apply them to its raw logits)."""
    import shutil

    from posttrain.recipes.models import resolve_model_path

    folder = tmp_path / "capped"
    shutil.copytree(resolve_model_path("tiny:qwen3"), folder)
    config = _json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        _json.dumps({**config, "final_logit_softcapping": softcap, "logit_scale": scale})
    )
    return _thr_trainer(tmp_path, model_name_or_path=str(folder), temperature=temperature)


def test_old_policy_q_follows_the_models_logit_postprocessing(tmp_path):
    softcap, scale, temperature = 2.0, 0.5, 0.7
    trainer = _postprocessed_trainer(tmp_path, softcap, scale, temperature)
    out, rewards = _mixed_out()
    hidden, lse = trainer._old_policy_hidden_and_lse(out)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    P, m = out["prompt_ids"].size(1), out["completion_mask"].bool()
    with torch.no_grad():
        raw = trainer.model(input_ids=ids, attention_mask=att).logits[:, P - 1 : -1].float()
        z = softcap * torch.tanh(raw * scale / softcap) / temperature
        trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, att, out["completion_ids"].size(1)
        )
    torch.testing.assert_close(
        lse[m],
        z.logsumexp(-1)[m],
        atol=1e-4,
        rtol=1e-5,
        msg="log-normaliser without the model's softcapping / logit scale",
    )
    vocab = torch.unique(out["completion_ids"][m])
    logits = trainer._thr_head_logits(hidden, vocab)
    pos = torch.searchsorted(vocab, out["completion_ids"]).clamp(max=vocab.numel() - 1)
    logq = logits.gather(-1, pos[..., None]).squeeze(-1) - lse
    torch.testing.assert_close(logq[m], trl_logps[m], atol=1e-4, rtol=1e-4)  # q agrees with TRL's own log-probs


def test_old_policy_forward_runs_under_autocast_and_refuses_multimodal_inputs(tmp_path, monkeypatch):
    import contextlib

    trainer = _thr_trainer(tmp_path)
    out, rewards = _mixed_out()
    entered, autocast = [], trainer.accelerator.autocast

    @contextlib.contextmanager
    def spy(*a, **k):
        entered.append(1)
        with autocast(*a, **k):
            yield

    monkeypatch.setattr(trainer.accelerator, "autocast", spy)
    trainer._old_policy_hidden_and_lse(out)
    assert entered, "the old-policy forward ran outside accelerator.autocast()"
    with pytest.raises(ValueError, match="multimodal"):
        trainer.thr_token_advantages({**out, "pixel_values": torch.zeros(8, 3, 4, 4)}, rewards)


# The NTHR paper's training setup (Deng et al., NeurIPS 2025; THR follows it), in verl's units: a rollout batch of
# `batch` prompts x 8 rollouts, optimizer mini-batches of `mini` prompts (batch / mini optimizer steps per rollout
# batch), `rollouts` rollout batches in all.
PAPER_SETUPS = {
    "thr_grpo/qwen2.5-0.5b-instruct_math": {"batch": 32, "mini": 16, "rollouts": 105, "max_completion_length": 2500},
    "thr_grpo/qwen2.5-math-1.5b_math": {"batch": 256, "mini": 64, "rollouts": 40, "max_completion_length": 3072},
}


@pytest.mark.parametrize("name", sorted(PAPER_SETUPS))
def test_gpu_recipes_reproduce_the_papers_batch_arithmetic(name):
    import re

    import yaml
    from support import ROOT

    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    launch = re.search(r"--config_file (\S+)", text.splitlines()[0])
    assert launch, "the recipe's first line names the accelerate config it is launched with"
    processes = yaml.safe_load((ROOT / launch.group(1)).read_text())["num_processes"]
    cfg = _load_recipe(name, {"output_dir": "unused"}).config
    want = PAPER_SETUPS[name]
    G, per_step = cfg.num_generations, cfg.per_device_train_batch_size * processes  # completions per micro-step
    assert G == 8
    opt_batch = per_step * cfg.gradient_accumulation_steps  # completions per optimizer step
    rollout_batch = per_step * cfg.steps_per_generation  # completions per generation (rollout) batch
    assert (rollout_batch / G, opt_batch / G) == (want["batch"], want["mini"]), (
        f"{processes} processes: {rollout_batch / G} prompts per rollout batch, {opt_batch / G} per optimizer step"
    )
    assert cfg.steps_per_generation % cfg.gradient_accumulation_steps == 0
    steps_per_rollout = cfg.steps_per_generation // cfg.gradient_accumulation_steps
    assert steps_per_rollout == want["batch"] // want["mini"]
    assert cfg.max_steps == want["rollouts"] * steps_per_rollout and cfg.num_iterations == 1
    assert cfg.max_completion_length == want["max_completion_length"]
    assert "spec" not in text and str(processes) in text.splitlines()[2]  # the comment states the process count


# --- wiring: the trainer's token advantages against plain forwards and the pure functions ------------------------


def test_trainer_token_advantages_equal_the_formula_on_plain_forwards(tmp_path):
    # Independent recomputation: the backbone's last hidden state at the positions that predict each completion
    # token (P-1 .. P+T-2), the full next-token distribution there sliced to V*, then token_influence and
    # thr_advantages. Pins which hidden states, which positions and which probabilities the trainer uses.
    trainer = _thr_trainer(tmp_path)
    out, rewards = _mixed_out()
    got = trainer.thr_token_advantages(out, rewards)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    P, mask = out["prompt_ids"].size(1), out["completion_mask"]
    with torch.no_grad():
        hidden = trainer.model.base_model(input_ids=ids, attention_mask=att).last_hidden_state[:, P - 1 : -1].float()
        logits = trainer.model(input_ids=ids, attention_mask=att).logits[:, P - 1 : -1].float()
    probs_full = torch.softmax(logits / trainer.temperature, -1)
    probs, pos, _ = slice_to_generated_vocab(probs_full, out["completion_ids"], mask)
    correct = rewards >= trainer.args.correct_threshold
    s, tau = token_influence(hidden, probs, pos, mask, correct, beta=trainer.args.thr_beta)
    want = thr_advantages(out["advantages"], s, tau, trainer.args.thr_p, mask, mode=trainer.args.thr_mode)
    assert not torch.allclose(want, out["advantages"][:, None] * mask)  # THR moved some token
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-5, rtol=1e-4)
    hidden_got, _ = trainer._old_policy_hidden_and_lse(out)
    torch.testing.assert_close(hidden_got, hidden, atol=1e-6, rtol=1e-5)
    # the logged statistics of the group, by hand from the same s and tau
    m = mask.bool()
    dominant = (s.abs() > tau) & m
    sign = torch.sign(out["advantages"][:, None] * s)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["thr/mixed_groups"] == 1.0
    assert logged["thr/dominant"] == pytest.approx((dominant.sum() / m.sum()).item(), abs=1e-6)
    assert logged["thr/positive"] == pytest.approx((((sign > 0) & dominant).sum() / dominant.sum()).item(), abs=1e-6)
    assert logged["thr/negative"] == pytest.approx((((sign < 0) & dominant).sum() / dominant.sum()).item(), abs=1e-6)
    assert logged["thr/abs_s"] == pytest.approx(s.abs()[m].mean().item(), rel=1e-4)
    assert logged["thr/tau"] == pytest.approx(float(tau), rel=1e-4)
