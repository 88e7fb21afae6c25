"""SynFlow pruning at initialisation (Tanaka et al., arXiv 2006.05467): a worked example, the conservation law on
random networks, the exponential schedule, layer-collapse avoidance, and the tool on the tiny causal LM."""

import pytest
import torch
from torch import nn

from posttrain.trainers.classic.synflow import (
    causal_lm_forward,
    global_top_mask,
    keep_pruned,
    keep_schedule,
    mask_density,
    prunable_parameters,
    synaptic_flow,
    synflow_prune,
    synflow_scores,
)

torch.set_num_threads(1)


def two_layer(w1, w2) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(w1))
        net[2].weight.copy_(torch.tensor(w2))
    return net


def ones_forward(n_in):
    return lambda m: m(torch.ones(1, n_in, dtype=next(m.parameters()).dtype))


def test_worked_example():
    # W1 = [[1, -2], [3, 0.5]], W2 = [[-1, 2]]: |W1| 1 = [3, 3.5], R = 1*3 + 2*3.5 = 10.
    # S(W1_ij) = |W2_i| |W1_ij| -> [[1, 2], [6, 1]]; S(W2_i) = |W2_i| (|W1| 1)_i -> [[3, 7]]. Each layer sums to R.
    net = two_layer([[1.0, -2.0], [3.0, 0.5]], [[-1.0, 2.0]])
    before = {n: p.clone() for n, p in net.named_parameters()}
    scores, r = synflow_scores(net, ones_forward(2), prunable_parameters(net))
    assert r == pytest.approx(10.0)
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[1.0, 2.0], [6.0, 1.0]]))
    torch.testing.assert_close(scores["2.weight"], torch.tensor([[3.0, 7.0]]))
    for n, p in net.named_parameters():  # signs and values restored
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    # keep half of the 6 weights, one shot: scores 7, 6, 3 survive
    masks, report = synflow_prune(net, 0.5, input_shape=(2,), iterations=1)
    assert masks["0.weight"].tolist() == [[False, False], [True, False]]
    assert masks["2.weight"].tolist() == [[True, True]]
    assert report["density"] == 0.5
    torch.testing.assert_close(net[0].weight, torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    assert report["flow"] == pytest.approx(6.0)  # |W2| . (|W1 * M1| 1) = [1, 2] . [0, 3]


def test_keep_schedule_is_exponential():
    s = keep_schedule(0.2, 100)
    assert len(s) == 100 and s[-1] == pytest.approx(0.2) and s[0] == pytest.approx(0.2**0.01)
    ratios = [b / a for a, b in zip(s, s[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # a constant factor per iteration
    with pytest.raises(ValueError, match="density"):
        keep_schedule(0.0, 10)
    with pytest.raises(ValueError, match="iterations"):
        keep_schedule(0.5, 0)


def test_global_top_mask_counts_over_all_tensors():
    scores = {"a": torch.tensor([5.0, 1.0, 4.0]), "b": torch.tensor([[3.0, 0.0], [2.0, 6.0]])}
    m = global_top_mask(scores, 3 / 7)
    assert m["a"].tolist() == [True, False, True] and m["b"].tolist() == [[False, False], [False, True]]
    assert mask_density(global_top_mask(scores, 4 / 7)) == pytest.approx(4 / 7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conservation_on_random_networks(seed):
    """Theorem 2 of the paper: in a bias-free ReLU chain each layer's saliencies sum to R, also under a mask."""
    torch.manual_seed(seed)
    sizes = [7, 13, 11, 5, 3]
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    net = nn.Sequential(*layers[:-1]).double()
    params = prunable_parameters(net)
    masks = {n: torch.rand(p.shape) < 0.6 for n, p in params.items()}
    scores, r = synflow_scores(net, ones_forward(7), params, masks)
    # R directly: 1^T prod |W_l * M_l| 1
    direct = torch.ones(7, dtype=torch.float64)
    for n, p in params.items():
        direct = (p.abs() * masks[n]) @ direct
    assert r == pytest.approx(float(direct.detach().sum()), rel=1e-12)
    assert r == pytest.approx(synaptic_flow(net, ones_forward(7), masks), rel=1e-12)
    for n, s in scores.items():
        assert float(s.sum()) == pytest.approx(r, rel=1e-9), n
        assert not s[~masks[n]].any()  # a pruned weight has no saliency


def test_no_layer_collapse_at_extreme_sparsity():
    """At 0.2 % density global magnitude pruning keeps only first-layer weights (the widest init range) and cuts the
    network (flow 0); iterative SynFlow keeps every layer and a positive flow (the paper's layer-collapse result)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 512, bias=False),
        nn.ReLU(),
        nn.Linear(512, 512, bias=False),
        nn.ReLU(),
        nn.Linear(512, 10, bias=False),
    )
    forward = ones_forward(64)
    magnitude = global_top_mask({n: p.abs() for n, p in prunable_parameters(net).items()}, 0.002)
    assert magnitude["2.weight"].sum() == 0 and synaptic_flow(net, forward, magnitude) == 0
    masks, report = synflow_prune(net, 0.002, forward=forward, iterations=100, apply=False)
    assert report["density"] == pytest.approx(0.002, abs=1e-5)
    assert report["flow"] > 0 and all(m.sum() > 0 for m in masks.values()), report["layer_density"]


def test_prunes_tiny_causal_lm_and_training_keeps_it_pruned(tmp_path):
    """The tool on any torch model: the tiny Qwen3-shaped LM, its value/output and MLP projections at 50 %.

    On the all-ones input every position carries the same vector, so attention is nearly uniform whatever the query and
    key projections are (only the rotary phases differ): their saliency is ~1e-7 of the others' and SynFlow removes
    them entirely. They are left out here."""
    from transformers import AutoModelForCausalLM

    from posttrain.recipes.tiny import tiny_model_path

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("qwen3"), dtype=torch.float32)
    forward = causal_lm_forward()
    scores, r = synflow_scores(model, forward, prunable_parameters(model))
    qk = [s.mean() for n, s in scores.items() if n.endswith(("q_proj.weight", "k_proj.weight"))]
    v = [s.mean() for n, s in scores.items() if n.endswith("v_proj.weight")]
    assert r > 0 and len(qk) == 4 and max(qk) < 1e-6 * min(v)
    targets = ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    params = prunable_parameters(model, targets)
    assert params and all(n.split(".")[-2] in targets for n in params)
    embed_before = model.get_input_embeddings().weight.clone()
    masks, report = synflow_prune(model, 0.5, forward=forward, iterations=20, modules=targets)
    assert report["density"] == pytest.approx(0.5, abs=1e-4) and report["flow"] > 0
    assert set(masks) == set(params) and all(m.any() for m in masks.values()), report["layer_density"]
    for n, p in params.items():
        assert not p[~masks[n]].any()
    torch.testing.assert_close(model.get_input_embeddings().weight, embed_before, rtol=0, atol=0)
    # a few AdamW steps with weight decay: pruned weights stay exactly zero, the rest train
    keep_pruned(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in params.items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in params.items():
        assert not p[~masks[n]].any(), n
        assert not torch.equal(p[masks[n]], before[n][masks[n]]), n


def test_bad_arguments():
    net = two_layer([[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="exactly one of input_shape and forward"):
        synflow_prune(net, 0.5)
    with pytest.raises(ValueError, match="no Linear/Conv weight"):
        prunable_parameters(net, ["q_proj"])
    with pytest.raises(ValueError, match="density"):
        synflow_prune(net, 1.5, input_shape=(2,))


def test_llm_recipe_prunes_then_trains_with_the_mask(tmp_path, capsys):
    """``synflow_*`` keys on an SFT recipe: the saved model has the pruned half of the named projections at zero
    after training, and the mask is SynFlow's on the loaded model."""
    from transformers import AutoModelForCausalLM

    from posttrain.cli import main
    from posttrain.recipes.tiny import tiny_model_path

    out = tmp_path / "run"
    assert main(["train", "synflow/tiny_sft", "--max_steps", "2", "--output_dir", str(out)]) == 0
    assert "SynFlow kept 0.5000 of the weights of 10 tensors" in capsys.readouterr().out
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path("qwen3"), dtype=torch.float32)
    targets = ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    masks, _ = synflow_prune(base, 0.5, forward=causal_lm_forward(), iterations=20, modules=targets)
    trained = dict(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).named_parameters())
    for name, mask in masks.items():
        assert not trained[name][~mask].any(), name
        assert trained[name][mask].ne(0).all(), name
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"synflow_density": 1.5}, "synflow_density expects a number in (0, 1]"),
        ({"synflow_densty": 0.5}, "unknown key 'synflow_densty'"),
        ({"synflow_modules": None}, "synflow_modules expects all-linear or a list"),
        ({"synflow_iterations": 0}, "synflow_iterations expects an integer >= 1"),
    ],
)
def test_llm_recipe_bad_keys(overrides, message):
    from posttrain import UserError
    from posttrain.recipes.config import load_recipe

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_recipe("synflow/tiny_sft", overrides)
    with pytest.raises(UserError, match="synflow_\\* keys apply to LLM recipes"):
        load_recipe("fedau/quadratic_fedau", {"synflow_density": 0.5})
