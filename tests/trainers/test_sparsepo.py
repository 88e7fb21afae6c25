"""SparsePO: worked examples, property tests, and the trainer on real batches.

The worked examples (beta 0.1, V = 3, two completion tokens per row) were computed with numpy from the loss as the
official code implements it (huawei-noah/HEBO at 04f4ece8c7ac95d1466763880def692fc2215f6f: the loss in
``SparsePO/src/trainers/sparse_trainer.py``, the mask network in ``SparsePO/src/masks/mask_models.py``
``SimpleMaskAllLayers``, the activation mask in ``SparsePO/src/trainers/mapo_trainer.py``; the equations are in the
docstring of ``posttrain/trainers/sparsepo.py``). They are not values from the paper (arXiv 2410.05102).
"""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from support import method_state
from torch import nn

from posttrain.recipes.config import load_recipe
from posttrain.recipes.train import build_trainer
from posttrain.trainers.sparsepo import (
    SimpleMaskAllLayers,
    activation_mask,
    sparsepo_loss,
    token_terms,
)

# --- worked example: beta 0.1, V = 3, two completion tokens per row; rows [chosen; rejected] -------------
POLICY = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0], [0.2, 0.0, 0.3]]])
REF = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]])
LABELS = torch.tensor([[0, 1], [1, 2]])
ALL = torch.ones(2, 2, dtype=torch.bool)
MASK = torch.tensor([[1.0, 0.0], [0.5, 2.0]])


def identity_head(size=3):
    head = nn.Linear(size, size, bias=False)
    nn.init.eye_(head.weight)
    return head


def worked_terms(chunk_size=None):
    # logits are the "hidden states" here, read out by identity heads
    return token_terms(POLICY, REF, LABELS, ALL, identity_head(), identity_head(), chunk_size)


def test_token_terms_match_the_worked_example():
    logratio, neg_kl, _ = worked_terms()
    torch.testing.assert_close(logratio, torch.tensor([[0.691006, -0.406575], [0.242932, 0.125693]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        neg_kl, torch.tensor([[-0.308994, -0.088663], [-0.031137, -0.007640]]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    "reward_mask, kl_mask, l1, expected",
    [
        (MASK, MASK, 0.0, 0.663777),  # SparsePO-common
        (MASK, MASK, 0.0005, 0.667277),  # + L1 0.001 each, halved for the common mask
        (torch.ones(2, 2), torch.ones(2, 2), 0.0, 0.679507),  # all masks 1: TDPO-1
        (MASK, torch.ones(2, 2), 0.0, 0.659868),  # mask_on_kl=False: KL unmasked
    ],
)
def test_sparsepo_loss_worked_examples(reward_mask, kl_mask, l1, expected):
    logratio, neg_kl, _ = worked_terms()
    loss = sparsepo_loss(logratio, neg_kl, reward_mask, kl_mask, ALL, beta=0.1, l1_reward=l1, l1_kl=l1)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_simple_mask_all_layers_worked_example():
    net = SimpleMaskAllLayers(num_layers=2, hidden_size=3, eps=1e-5)
    with torch.no_grad():
        net.layer_weight.copy_(torch.tensor([[0.5, -0.2, 0.1], [-0.3, 0.4, 0.2]]))
        net.layer_bias.copy_(torch.tensor([0.1, -0.05]))
        net.mixer_weight.copy_(torch.tensor([1.0, 0.8]))
    h1 = torch.tensor([[[1, 2, 3], [0.5, -0.5, 0], [2, 2, -1]]], dtype=torch.float32)
    h2 = torch.tensor([[[0, 1, 0], [1, 1, 1.5], [-1, 0, 1]]], dtype=torch.float32)
    mask = net([h1, h2], torch.ones(1, 3))
    torch.testing.assert_close(mask, torch.tensor([[0.469105, 1.086986, 0.620605]]), atol=1e-6, rtol=0)


def test_mapo_activation_mask_worked_example():
    features = torch.tensor([[0.2, -0.4, 1.0, 0.1, 5.0]])  # the last position is padding
    got = activation_mask(features, torch.tensor([[1, 1, 1, 1, 0]]))
    torch.testing.assert_close(got, torch.tensor([[0.428571, 0.0, 1.0, 0.357143, 0.0]]), atol=1e-6, rtol=0)


# --- properties on fresh random inputs ------------------------------------------------------------------


def test_uniform_masks_give_tdpo1_on_random_inputs():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    logratio, neg_kl = torch.randn(6, 9, generator=g), -torch.rand(6, 9, generator=g)
    cm = torch.rand(6, 9, generator=g) > 0.3
    ones = torch.ones(6, 9)
    got = sparsepo_loss(logratio, neg_kl, ones, ones, cm, beta=0.3)
    lr, kl = (logratio * cm).sum(-1), (neg_kl * cm).sum(-1)
    u, d = lr[:3] - lr[3:], kl[:3] - kl[3:]
    torch.testing.assert_close(got, -F.logsigmoid(0.3 * (u - d)))


def test_token_terms_gradient_is_exact():
    # the hand-written backward against finite differences, in float64, chunked
    torch.manual_seed(torch.seed() % 2**31)
    head, ref_head = nn.Linear(5, 11).double(), nn.Linear(5, 11).double()
    hidden = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    ref_hidden, labels, mask = (
        torch.randn(3, 4, 5, dtype=torch.float64),
        torch.randint(0, 11, (3, 4)),
        torch.rand(3, 4) > 0.3,
    )
    weights = torch.randn(2, 3, 4, dtype=torch.float64)

    def f(h, w, b):
        lr, kl, _ = token_terms(h, ref_hidden, labels, mask, SimpleNamespace(weight=w, bias=b), ref_head, chunk_size=2)
        return (weights[0] * lr + weights[1] * kl).sum()

    w0, b0 = head.weight.detach().clone().requires_grad_(), head.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (hidden, w0, b0))


def test_chunked_token_terms_equal_unchunked_values_and_gradients():
    torch.manual_seed(torch.seed() % 2**31)
    head, ref_head = nn.Linear(8, 50), nn.Linear(8, 50)
    hidden = torch.randn(4, 7, 8, requires_grad=True)
    ref_hidden, labels = torch.randn(4, 7, 8), torch.randint(0, 50, (4, 7))
    mask = torch.rand(4, 7) > 0.25
    results = []
    for chunk in (None, 3):
        hidden.grad, head.weight.grad = None, None
        terms = token_terms(hidden, ref_hidden, labels, mask, head, ref_head, chunk)
        (terms[0].sum() + 0.7 * terms[1].sum()).backward()
        results.append((*[t.detach() for t in terms], hidden.grad.clone(), head.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (results[0][0][~mask] == 0).all() and (results[0][1] <= 1e-6).all()  # -KL <= 0


def test_bf16_token_terms_gradients_match_float64_autograd_within_bf16_precision():
    # bf16 activations take bf16 gradient products (the tensor-core path on a GPU): the gradients must still be
    # those of plain float64 autograd through log-softmaxes on the same (bf16-representable) numbers
    torch.manual_seed(torch.seed() % 2**31)
    head, ref_head = nn.Linear(16, 300).bfloat16(), nn.Linear(16, 300).bfloat16()
    hidden, ref_hidden = torch.randn(3, 9, 16).bfloat16(), torch.randn(3, 9, 16).bfloat16()
    labels, mask = torch.randint(0, 300, (3, 9)), torch.rand(3, 9) > 0.2

    def leaves(dtype):
        return [t.detach().to(dtype).requires_grad_() for t in (hidden, head.weight, head.bias)]

    h, w, b = leaves(torch.bfloat16)
    lr, kl, _ = token_terms(h, ref_hidden, labels, mask, SimpleNamespace(weight=w, bias=b), ref_head, chunk_size=5)
    (lr.sum() + 0.7 * kl.sum()).backward()

    h64, w64, b64 = leaves(torch.float64)
    logp = F.log_softmax(h64[mask] @ w64.T + b64, -1)
    ref_logp = F.log_softmax(
        ref_hidden[mask].double() @ ref_head.weight.double().T + ref_head.bias.double(), -1
    ).detach()
    y = labels[mask, None]
    exact_lr = (logp.gather(-1, y) - ref_logp.gather(-1, y)).squeeze(-1)
    exact_neg_kl = (ref_logp.exp() * (logp - ref_logp)).sum(-1)
    (exact_lr.sum() + 0.7 * exact_neg_kl.sum()).backward()
    for low, exact in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.double(), exact, atol=0.02 * exact.abs().max().item(), rtol=0.02)


# --- the trainer on real batches ----------------------------------------------------------------------


def make_trainer(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path), "max_steps": 2, **overrides}
    return build_trainer(load_recipe("sparsepo/tiny", values))


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def reference_loss(trainer, batch, reward_mask=None):
    """The loss from plain full-vocabulary forwards of policy and reference, no chunking, no patching."""
    policy, ref = trainer.model, trainer.ref_model
    ids, attn, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    mask = cm[:, 1:].bool()
    labels = ids[:, 1:].masked_fill(~mask, 0).unsqueeze(-1)
    logp = F.log_softmax(
        policy._sparsepo_original_forward(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1
    )
    with torch.no_grad():
        ref_logp = F.log_softmax(ref(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    logratio = (logp.gather(-1, labels) - ref_logp.gather(-1, labels)).squeeze(-1) * mask
    neg_kl = (ref_logp.exp() * (logp - ref_logp)).sum(-1) * mask
    m = torch.ones_like(logratio) if reward_mask is None else reward_mask
    return sparsepo_loss(logratio, neg_kl, m, m, mask, trainer.args.beta).mean()


def perturb(model, seed=0):
    """Move the policy (not its mask network) away from the reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparsepo_masks" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_trainer_loss_equals_sparsepo_loss_on_a_real_batch(tmp_path):
    trainer = make_trainer(tmp_path, mask_type="uniform")
    perturb(trainer.model)
    batch = first_batch(trainer)
    got = trainer.compute_loss(trainer.model, batch)
    assert got.item() == pytest.approx(reference_loss(trainer, batch).item(), abs=1e-6)


def test_trainer_chunked_path_equals_unchunked_path(tmp_path):
    losses, grads = [], []
    for chunk in (3, 10**9):
        trainer = make_trainer(tmp_path, kl_chunk_size=chunk)
        perturb(trainer.model)
        batch = first_batch(trainer)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_learned_mask_reads_the_reference_and_gets_gradients(tmp_path):
    trainer = make_trainer(tmp_path)
    perturb(trainer.model)
    batch = first_batch(trainer)
    nets = trainer.model.sparsepo_masks
    assert list(nets) == ["common"]
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert nets["common"].layer_weight.grad is not None and nets["common"].layer_weight.grad.abs().sum() > 0
    groups = trainer.create_optimizer().param_groups
    mask_ids = {id(p) for p in nets.parameters()}
    decays = {g["weight_decay"] for g in groups if any(id(p) in mask_ids for p in g["params"])}
    assert decays == {trainer.args.mask_weight_decay, 0.0}  # weights: mask_weight_decay; LayerNorm/biases: none


def test_at_initialisation_uniform_sparsepo_equals_dpo_loss_and_gradients(tmp_path):
    # Reduce-to-parent: with policy = reference, -KL(ref||pi) and its gradient vanish, so TDPO-1 (uniform
    # masks) and DPO agree in loss (log 2) and gradients on the same batch.
    sparse = make_trainer(tmp_path / "s", mask_type="uniform")
    dpo = build_trainer(load_recipe("dpo/tiny", {"output_dir": str(tmp_path / "d"), "max_steps": 2}))
    batch = first_batch(dpo)
    grads = []
    for trainer in (sparse, dpo):
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        assert loss.item() == pytest.approx(0.693147, abs=1e-6)
        grads.append({n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-4, msg=name)


def test_activation_masks_are_minmax_of_reference_activations(tmp_path):
    trainer = make_trainer(tmp_path, mask_type="activation")
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, batch)
    features = trainer._capture.features
    kinds = {kind for kind, *_ in features}
    assert kinds == {"mlp", "attn", "resid"}
    assert {"delta_attn", "delta_mlp"} <= {name for kind, name, *_ in features if kind == "resid"}  # official points
    mask = batch["completion_mask"][:, 1:].bool()
    m = trainer._activation_mask(torch.zeros(mask.shape), mask)
    assert ((m >= -1e-6) & (m <= 1 + 1e-6)).all() and (m[~mask] == 0).all()


def test_precompute_ref_log_probs_is_refused(tmp_path):
    from posttrain import UserError

    with pytest.raises(UserError, match="precompute_ref_log_probs"):
        load_recipe("sparsepo/tiny", {"precompute_ref_log_probs": True})


def test_mask_network_is_method_state_and_restored(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    from safetensors.torch import load_file

    saved = method_state(checkpoint)["trainer"]["mask_networks"]
    assert saved and not any(k.startswith("sparsepo") for k in load_file(str(checkpoint / "model.safetensors")))
    fresh = make_trainer(tmp_path / "other")
    assert any(not torch.equal(v, saved[k]) for k, v in fresh.model.sparsepo_masks.state_dict().items())
    fresh.restore_method_state(checkpoint)
    for key, value in fresh.model.sparsepo_masks.state_dict().items():
        torch.testing.assert_close(value, saved[key], atol=0, rtol=0)


def test_metrics_are_logged(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, logging_steps=1)
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    for key in ("mask/mean", "mask/sparsity", "mask/chosen_mass", "mask/rejected_mass", "rewards/margins", "kl/seq"):
        assert key in logged, key
    assert 0.0 <= logged["mask/sparsity"] <= 1.0
    json.dumps(logged)


@pytest.mark.parametrize("mask_type", ["learned", "activation"])
def test_lora_reference_is_the_adapter_disabled_policy(mask_type, tmp_path):
    from posttrain.cli import main

    lora = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj"]
    assert (
        main(
            [
                "train",
                "sparsepo/tiny",
                "--mask_type",
                mask_type,
                "--max_steps",
                "2",
                "--output_dir",
                str(tmp_path),
                *lora,
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["metrics"]["kl/seq"]["first"] == pytest.approx(0.0, abs=1e-7)  # LoRA B = 0: policy == reference
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (method_state(tmp_path)["trainer"] is not None) == (mask_type == "learned")  # the final folder has it too


# --- fidelity to the official code (huawei-noah/HEBO SparsePO at 04f4ece8) --------------------------------


def test_resc_and_znorm_statistics_are_constants_in_the_gradient():
    # The official apply_masked_rescaling / apply_masked_z_norm rebuild min, max and std with torch.Tensor(list):
    # constants for autograd (the z-norm mean stays differentiable). So d resc(x)_i / dx_j = delta_ij / (max - min).
    from posttrain.trainers.sparsepo import _activate

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float64)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, dtype=torch.float64)
    (_activate(x, "resc", mask) * w).sum().backward()
    xm = x.detach().masked_fill(mask == 0, float("nan"))
    span = xm.nan_to_num(-1e9).amax(-1, keepdim=True) - xm.nan_to_num(1e9).amin(-1, keepdim=True)
    torch.testing.assert_close(x.grad, w * mask / span)

    x.grad = None
    (_activate(x, "znorm", mask) * w).sum().backward()
    n = mask.sum(-1, keepdim=True)
    xd = x.detach()
    mean = (xd * mask).sum(-1, keepdim=True) / n
    std = (((xd - mean) * mask) ** 2).sum(-1, keepdim=True).div(n - 1).sqrt()
    z = ((xd - mean) / std).masked_fill(mask == 0, float("nan"))
    zspan = z.nan_to_num(-1e9).amax(-1, keepdim=True) - z.nan_to_num(1e9).amin(-1, keepdim=True)
    gz = w * mask / zspan  # through the rescaling; then through (x - mean(x)) / std with std constant
    expected = (gz - (gz * mask).sum(-1, keepdim=True) / n * mask) / std
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize(
    "on_reward, on_kl, independent, halved",
    [
        (True, True, False, True),  # one common mask on both terms: the official trainer halves both coefficients
        (True, False, False, False),  # a common mask on one term only: not halved
        (False, True, False, False),
        (True, True, True, False),  # two independent masks: not halved
    ],
)
def test_l1_is_halved_only_for_a_common_mask_on_both_terms(on_reward, on_kl, independent, halved, tmp_path):
    trainer = make_trainer(
        tmp_path,
        mask_on_reward=on_reward,
        mask_on_kl=on_kl,
        rw_kl_independent=independent,
        l1_norm_param_u=0.004,
        l1_norm_param_d=0.002,
    )
    factor = 0.5 if halved else 1.0
    assert (trainer.l1_reward, trainer.l1_kl) == pytest.approx((0.004 * factor, 0.002 * factor))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_mapo_hooks_on_gpt2_and_gpt_neox(arch, tmp_path):
    # The paper's model families: every hook type finds its points (no silent fall-back to the logits alone).
    trainer = make_trainer(tmp_path, model_name_or_path=f"tiny:{arch}", mask_type="activation")
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)
    names = {
        kind: sorted({name for k, name, *_ in trainer._capture.features if k == kind})
        for kind in ("mlp", "attn", "resid")
    }
    assert names["mlp"] == ["post_act"]
    assert names["attn"] == ["k", "q", "v", "v_out"]
    assert names["resid"] == [
        "delta_attn",
        "delta_mlp",
        "input_ln_attn",
        "post_emb",
        "post_ln_attn",
        "post_ln_f",
        "post_mlp",
    ]
    for hook in ("mlp", "attn", "resid", "mlp,logits"):
        trainer = make_trainer(
            tmp_path, model_name_or_path=f"tiny:{arch}", mask_type="activation", activation_hook=hook
        )
        m = trainer.token_masks(first_batch(trainer))["reward_mask"]
        assert torch.isfinite(m).all() and m.abs().sum() > 0


def test_mapo_hook_type_without_points_names_the_model_class(tmp_path):
    from posttrain.trainers.sparsepo import ActivationCapture

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_model = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="'mlp'.*Opaque"):
        ActivationCapture(Opaque(), "mlp")


@pytest.mark.parametrize("mapping", ["none", "sigmoid", "layernorm"])
def test_mapo_activation_mapping(mapping):
    from posttrain.trainers.sparsepo import map_activation

    x = torch.randn(2, 3, 8)
    expected = {"none": x.mean(-1), "sigmoid": torch.sigmoid(x).mean(-1), "layernorm": F.layer_norm(x, (8,)).mean(-1)}[
        mapping
    ]
    torch.testing.assert_close(map_activation(x, mapping), expected)


def test_mapo_logits_hook_with_sigmoid_mapping_is_the_mean_sigmoid_of_reference_logits(tmp_path):
    trainer = make_trainer(tmp_path, mask_type="activation", activation_hook="logits", activation_mapping="sigmoid")
    batch = first_batch(trainer)
    got = trainer.token_masks(batch)["reward_mask"]
    mask = batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        logits = trainer.ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    torch.testing.assert_close(got, torch.sigmoid(logits.float()).mean(-1) * mask, atol=1e-6, rtol=1e-5)


def test_activation_hook_lists_are_checked():
    from posttrain import UserError

    load_recipe("sparsepo/tiny", {"mask_type": "activation", "activation_hook": "mlp,resid"})
    with pytest.raises(UserError, match="activation_hook"):
        load_recipe("sparsepo/tiny", {"mask_type": "activation", "activation_hook": "mlp,bogus"})


@pytest.mark.parametrize(
    "on_reward, on_kl, independent, built",
    [
        (True, False, True, ["reward"]),
        (False, True, True, ["kl"]),
        (True, True, True, ["reward", "kl"]),
        (False, False, False, []),
        (True, False, False, ["common"]),
    ],
)
def test_only_the_mask_networks_in_use_are_built(on_reward, on_kl, independent, built, tmp_path):
    # an unused network has parameters without gradients: DDP with gradient checkpointing fails on them
    trainer = make_trainer(tmp_path, mask_on_reward=on_reward, mask_on_kl=on_kl, rw_kl_independent=independent)
    assert list(trainer.model.sparsepo_masks) == built
    trainer.compute_loss(trainer.model, first_batch(trainer)).backward()
    assert all(p.grad is not None for p in trainer.model.sparsepo_masks.parameters())


def test_independent_kl_mask_metrics_are_logged(tmp_path):
    trainer = make_trainer(tmp_path, rw_kl_independent=True)
    trainer.model.train()
    trainer.compute_loss(trainer.model, first_batch(trainer))
    logged = trainer._metrics["train"]
    for key in ("kl_mask/mean", "kl_mask/sparsity", "kl_mask/chosen_mass", "kl_mask/rejected_mass"):
        assert key in logged, key
    assert 0.0 <= logged["kl_mask/sparsity"][-1] <= 1.0


def test_prediction_step_with_logits_for_compute_metrics(tmp_path):
    # Trainer.evaluate with compute_metrics set calls prediction_step(prediction_loss_only=False), which reads
    # outputs.logits from compute_loss(return_outputs=True), as for DPO
    trainer = make_trainer(tmp_path)
    trainer.model.eval()
    batch = first_batch(trainer)
    loss, logits, labels = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
    assert torch.isfinite(loss) and logits.shape == (*batch["input_ids"].shape, trainer.model.config.vocab_size)
    assert torch.equal(labels, batch["input_ids"])
    assert loss.item() == pytest.approx(
        trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)[0].item(), abs=1e-6
    )


def test_lora_reference_uses_the_original_head_with_lm_head_in_modules_to_save(tmp_path):
    # modules_to_save: [lm_head] trains a copy of the head; the reference (adapter disabled) must use the original
    values = {
        "output_dir": str(tmp_path),
        "max_steps": 2,
        "mask_type": "uniform",
        "use_peft": True,
        "lora_r": 4,
        "lora_target_modules": ["q_proj", "v_proj"],
        "lora_modules_to_save": ["lm_head"],
    }
    trainer = build_trainer(load_recipe("sparsepo/tiny", values))
    model = trainer.model
    trained = [p for n, p in model.named_parameters() if "lm_head" in n and "modules_to_save" in n]
    assert trained
    with torch.no_grad():
        for p in trained:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    batch = first_batch(trainer)
    got = trainer.token_masks(batch)["neg_kl"]
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        with model.disable_adapter():
            ref_logp = F.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    expected = (ref_logp.exp() * (logp - ref_logp)).sum(-1) * mask
    assert expected.abs().max() > 1e-4  # the trained head moved the policy
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_lora_on_the_lm_head_is_refused(tmp_path):
    values = {
        "output_dir": str(tmp_path),
        "max_steps": 2,
        "use_peft": True,
        "lora_r": 4,
        "lora_target_modules": ["q_proj", "lm_head"],
    }
    with pytest.raises(Exception, match="lm_head"):  # TRL refuses it first; SparsePO checks the head type too
        build_trainer(load_recipe("sparsepo/tiny", values))


def test_token_terms_backward_allocates_head_gradients_inside_the_zero3_gather(monkeypatch):
    # Under ZeRO-3 a partitioned head weight has numel 0 outside maybe_gather_lm_head_ctx: simulate that and
    # call the backward directly; its weight/bias gradients must have the gathered shape and the right values.
    from contextlib import contextmanager

    import trl.trainer.utils as trl_utils

    from posttrain.trainers.sparsepo import _TokenTerms

    torch.manual_seed(0)
    head, ref_head = nn.Linear(5, 11), nn.Linear(5, 11)
    full_w, full_b = head.weight.detach().clone(), head.bias.detach().clone()
    hidden, ref_hidden, labels = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 11, (6,))
    g_l, g_d = torch.randn(6), torch.randn(6)
    w, b = nn.Parameter(torch.empty(0)), nn.Parameter(torch.empty(0))

    @contextmanager
    def gather(*params):
        w.data, b.data = full_w, full_b
        try:
            yield
        finally:
            w.data, b.data = torch.empty(0), torch.empty(0)

    monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", gather)
    # the forward's saved log-normalisers of policy and reference, (M, 1) each
    lse = F.linear(hidden, full_w, full_b).logsumexp(-1, keepdim=True)
    rlse = ref_head(ref_hidden).detach().logsumexp(-1, keepdim=True)
    ctx = SimpleNamespace(
        saved_tensors=(hidden, ref_hidden, labels, w, b, ref_head.weight.detach(), ref_head.bias.detach(), lse, rlse),
        chunk=4,
        needs_input_grad=(True, False, False, True, True, False, False, False, False),
    )
    _, _, _, d_w, d_b, *_ = _TokenTerms.backward(ctx, g_l, g_d, None)

    w0, b0 = full_w.clone().requires_grad_(), full_b.clone().requires_grad_()
    lr, kl, _ = token_terms(
        hidden[None],
        ref_hidden[None],
        labels[None],
        torch.ones(1, 6, dtype=torch.bool),
        SimpleNamespace(weight=w0, bias=b0),
        ref_head,
    )
    (g_l * lr[0] + g_d * kl[0]).sum().backward()
    torch.testing.assert_close(d_w, w0.grad)
    torch.testing.assert_close(d_b, b0.grad)


# --- wiring: what the trainer feeds the math, against plain forwards of policy and reference --------------------


def plain_terms(trainer, batch):
    """(logratio, neg_kl, mask) from plain full-vocabulary forwards of policy and reference (no chunking)."""
    ids, attn, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    mask = cm[:, 1:].bool()
    labels = ids[:, 1:].masked_fill(~mask, 0).unsqueeze(-1)
    with torch.no_grad():
        logp = F.log_softmax(
            trainer.model._sparsepo_original_forward(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1
        )
        ref_logp = F.log_softmax(trainer.ref_model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
    logratio = (logp.gather(-1, labels) - ref_logp.gather(-1, labels)).squeeze(-1) * mask
    neg_kl = (ref_logp.exp() * (logp - ref_logp)).sum(-1) * mask
    return logratio, neg_kl, mask


def test_learned_mask_is_the_mask_network_on_the_reference_hidden_states(tmp_path):
    # The mask network reads the reference's hidden states (no gradient), not the policy's: with the policy moved
    # away from the reference the two differ, and the trainer's mask must equal the network on the reference's.
    trainer = make_trainer(tmp_path)
    perturb(trainer.model)
    trainer.model.eval()  # no dropout: the network's output is a function of its input
    batch = first_batch(trainer)
    got = trainer._terms_and_masks(trainer.model, batch)
    mask = batch["completion_mask"][:, 1:].bool()
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref_states = trainer.ref_model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
        policy_states = trainer.model._sparsepo_original_forward(
            input_ids=ids, attention_mask=attn, output_hidden_states=True
        ).hidden_states
        net = trainer.model.sparsepo_masks["common"]
        want = net([h[:, :-1] for h in ref_states[1:]], mask) * mask
        other = net([h[:, :-1] for h in policy_states[1:]], mask) * mask
    assert not torch.allclose(want, other, atol=1e-4)  # the test can tell the two inputs apart
    torch.testing.assert_close(got["reward_mask"], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["kl_mask"], want, atol=1e-6, rtol=1e-5)
    logratio, neg_kl, _ = plain_terms(trainer, batch)
    torch.testing.assert_close(got["logratio"], logratio, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["neg_kl"], neg_kl, atol=1e-5, rtol=1e-5)


def test_logged_rewards_are_hand_computed_from_the_chosen_and_rejected_rows(tmp_path):
    # The collator puts the chosen rows first, then the rejected ones (DPO's concatenated batch); the logged
    # rewards are beta (sum l + sum d) of each (the official trainer's), averaged over the rows.
    trainer = make_trainer(tmp_path, mask_type="uniform")
    perturb(trainer.model)
    trainer.model.train()  # the training metrics (dropout is disabled in the policy)
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, batch)
    logratio, neg_kl, mask = plain_terms(trainer, batch)
    rewards = trainer.args.beta * ((logratio + neg_kl) * mask).sum(-1)
    chosen, rejected = rewards.chunk(2)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert not torch.allclose(chosen, rejected)
    assert logged["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-6)
    assert logged["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-6)
    assert logged["rewards/margins"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-6)
    assert logged["rewards/accuracies"] == pytest.approx((chosen > rejected).float().mean().item())
    assert logged["kl/seq"] == pytest.approx((-(neg_kl * mask).sum(-1)).mean().item(), abs=1e-6)
