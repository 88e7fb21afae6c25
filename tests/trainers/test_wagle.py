"""WAGLE: the spec's worked examples (§4.8), the exact chunked global top-k, and the model-side helpers."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from posttrain.trainers.wagle import (
    WAGLEConfig,
    accumulate_gradients,
    apply_gradient_mask,
    attribution_scores,
    build_mask,
    graddiff_loss,
    load_mask,
    magnitude_scores,
    mask_density,
    npo_forget_term,
    npo_loss,
    po_loss,
    random_scores,
    save_mask,
    snip_scores,
    top_ratio_mask,
)

torch.set_num_threads(1)

# --- spec §4.8 ------------------------------------------------------------------------------------------
THETA = torch.tensor([0.5, -0.2, 0.01, 1.0, -0.3, 0.05])
G_R = torch.tensor([1e-3, -2e-3, 0.0, 5e-4, 1e-6, -1e-3])
G_F = torch.tensor([0.1, 0.05, 0.3, -0.02, 0.2, -0.4])


def split(x):
    """The six entries as two tensors of different shapes, so that 'global' is tested across tensors."""
    return {"a.weight": x[:2].clone(), "b.weight": x[2:].reshape(2, 2).clone()}


def joined(d):
    return torch.cat([d["a.weight"].reshape(-1), d["b.weight"].reshape(-1)])


@pytest.mark.parametrize(
    "gamma, s, mask",
    [
        (1e-3, [-0.05, 0.09, 0.003, -0.01, -0.0602, -0.42], [0, 1, 0, 0, 1, 1]),
        (1e-6, [-99.95, 99.99, 0.003, 9.98, -0.26, -400.02], [1, 1, 0, 0, 0, 1]),
    ],
)
@pytest.mark.parametrize("as_two_tensors", [False, True])
def test_attribution_worked_example(gamma, s, mask, as_two_tensors):
    to = split if as_two_tensors else (lambda x: {"w": x.clone()})
    scores = attribution_scores(to(THETA), to(G_F), to(G_R), gamma)
    got = joined(scores) if as_two_tensors else scores["w"]
    torch.testing.assert_close(got, torch.tensor(s).abs(), rtol=1e-5, atol=1e-7)
    m = top_ratio_mask(scores, 0.5)
    assert (joined(m) if as_two_tensors else m["w"]).tolist() == [bool(v) for v in mask]


def test_baseline_scores_worked_example():
    snip = snip_scores({"w": THETA}, {"w": G_F})["w"]
    torch.testing.assert_close(snip, torch.tensor([0.05, 0.01, 0.003, 0.02, 0.06, 0.02]), rtol=1e-5, atol=1e-7)
    magnitude = top_ratio_mask(magnitude_scores({"w": THETA}), 0.5)["w"]
    assert magnitude.nonzero().flatten().tolist() == [0, 3, 4]


def test_npo_forget_term_worked_example():
    term = npo_forget_term(torch.tensor(2.0), torch.tensor(1.5), beta=0.1)
    assert term.item() == pytest.approx(13.369193, abs=1e-5)
    full = npo_loss(torch.tensor(2.0), torch.tensor(1.5), torch.tensor(0.7), beta=0.1, retain_weight=2.0)
    assert full.item() == pytest.approx(13.369193 + 1.4, abs=1e-5)


def test_graddiff_and_po_losses():
    f, r = torch.tensor(2.5, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    graddiff_loss(f, r, retain_weight=3.0).backward()
    assert (f.grad.item(), r.grad.item()) == (-1.0, 3.0)  # gradient ascent on the forget CE
    assert po_loss(torch.tensor(1.25), torch.tensor(0.5), 2.0).item() == 2.25


def test_npo_gradient_pushes_forget_ce_up_and_vanishes_as_it_grows():
    ce = torch.tensor([1.5, 10.0, 100.0], requires_grad=True)
    npo_forget_term(ce, torch.tensor(1.5)).sum().backward()
    g = ce.grad
    assert (g < 0).all() and g[0] == pytest.approx(-1.0) and g[2].abs() < 1e-3  # -2 sigma(-beta d): -1 at d=0


# --- the chunked top-k equals the exact global top-k -----------------------------------------------------


def exact_mask(scores, ratio):
    """Reference: stable descending sort of all entries concatenated (earliest entry wins a tie)."""
    flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
    k = int(flat.numel() * ratio)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = keep[i:i + s.numel()].view(s.shape)
        i += s.numel()
    return out, flat, k


def random_score_dict(g, ties):
    shapes = [tuple(torch.randint(1, 6, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist())
              for _ in range(int(torch.randint(1, 25, (1,), generator=g)))]
    out = {}
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, generator=g)
        if ties:  # a handful of levels, both zeros, negatives
            x = torch.randint(-2, 4, shape, generator=g).float() / 2
            x[x == 0] = torch.tensor(-0.0) if i % 2 else 0.0
        out[f"layer{i}.w"] = x
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_chunked_mask_equals_exact_global_topk(dtype, ties):
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    for trial in range(15):
        scores = {n: s.to(dtype) for n, s in random_score_dict(g, ties).items()}
        ratio = float(torch.rand(1, generator=g))
        chunk = int(torch.randint(1, 9, (1,), generator=g))
        got = top_ratio_mask(scores, ratio, chunk_size=chunk)
        want, flat, k = exact_mask(scores, ratio)
        assert list(got) == list(scores), f"seed {seed}"
        for name in scores:
            assert got[name].dtype == torch.bool and got[name].shape == scores[name].shape
            assert torch.equal(got[name], want[name]), f"seed {seed} trial {trial} {name}"
        picked = torch.cat([scores[n].reshape(-1)[got[n].reshape(-1)].double() for n in scores])
        assert picked.numel() == k
        torch.testing.assert_close(picked.sort(descending=True).values, torch.topk(flat, k).values)


def test_mask_count_is_int_n_ratio_and_extremes():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    scores = {"a": torch.rand(10, 10, generator=g), "b": torch.rand(7, generator=g)}
    for ratio in (0.29, 0.5, 0.95, 1e-9, 0.999):
        m = top_ratio_mask(scores, ratio, chunk_size=13)
        assert sum(int(v.sum()) for v in m.values()) == int(107 * ratio)
    assert all(v.all() for v in top_ratio_mask(scores, 1.0).values())
    assert not any(v.any() for v in top_ratio_mask(scores, 0.0).values())
    with pytest.raises(ValueError, match="ratio"):
        top_ratio_mask(scores, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        top_ratio_mask({"a": torch.tensor([1.0, float("nan")])}, 0.5)


def test_extreme_values_keep_their_order():
    x = torch.tensor([float("inf"), 3.4e38, 1e-45, 0.0, -1e-45, -3.4e38, float("-inf"), 1.0])
    for k in range(1, 8):
        m = top_ratio_mask({"x": x}, k / 8)["x"]
        assert m.nonzero().flatten().tolist() == sorted(torch.sort(x, descending=True, stable=True).indices[:k].tolist())


def test_top_ratio_mask_never_sorts(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("global sort/select called")

    for name in ("sort", "argsort", "topk", "kthvalue", "msort"):
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    scores = {"a": torch.rand(50), "b": torch.rand(3, 40)}
    assert sum(int(v.sum()) for v in top_ratio_mask(scores, 0.3, chunk_size=16).values()) == 51


# --- model side ------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 7)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, input_ids, labels):
        logits = self.head(self.drop(self.emb(input_ids)))
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 7, (2, 3), generator=g), "labels": torch.randint(0, 7, (2, 3), generator=g)}
            for _ in range(n)]


def test_accumulate_gradients_is_the_sum_of_per_batch_grads():
    torch.manual_seed(torch.seed() % 2**31)
    model, data = Tiny(), batches(4, 1)
    model.train()
    manual = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    model.eval()  # the reference also runs without dropout
    for b in data[:3]:
        model.zero_grad()
        model(**b).loss.backward()
        for n in manual:
            manual[n] += 2.0 * model.get_parameter(n).grad
    model.train()
    got = accumulate_gradients(model, data, max_batches=3, to_cpu=True, grad_scale=2.0)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode restored, grads cleared
    assert list(got) == list(manual)  # trainable parameters only, in order
    for n in manual:
        torch.testing.assert_close(got[n], manual[n])
    one = accumulate_gradients(model, data[:1], loss_fn=lambda m, b: 3 * m(**b).loss)
    model.eval()
    model.zero_grad()
    (3 * model(**data[0]).loss).backward()
    torch.testing.assert_close(one["head.weight"], model.head.weight.grad)


def test_ddp_wrapper_gives_bare_names_and_the_same_sums(tmp_path):
    import torch.distributed as dist

    torch.manual_seed(torch.seed() % 2**31)
    model, data = Tiny(), batches(2, 3)
    plain = accumulate_gradients(model, data)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        wrapped = accumulate_gradients(ddp, data)
        ddp(**data[0]).loss.backward()
        mask = {n: torch.zeros_like(g, dtype=torch.bool) for n, g in wrapped.items()}
        apply_gradient_mask(ddp, mask)
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    assert list(wrapped) == list(plain) == ["emb.weight", "head.weight", "head.bias"]
    for n in plain:
        torch.testing.assert_close(wrapped[n], plain[n])


def test_apply_gradient_mask_freezes_masked_weights_under_sgd():
    torch.manual_seed(torch.seed() % 2**31)
    layer = nn.Linear(5, 4)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    mask = {"weight": torch.rand(4, 5) > 0.5, "bias": torch.tensor([True, False, True, False])}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, weight_decay=0.0)
    layer(torch.randn(8, 5)).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
    apply_gradient_mask(layer, mask)
    opt.step()
    for n, p in layer.named_parameters():
        assert torch.equal(p[~mask[n]], before[n][~mask[n]])
        assert (p[mask[n]] != before[n][mask[n]]).all()
    with pytest.raises(KeyError, match="bias"):
        apply_gradient_mask(layer, {"weight": mask["weight"]})


def test_build_mask_methods_on_a_model():
    torch.manual_seed(torch.seed() % 2**31)
    model, data = Tiny(), batches(3, 2)
    gf, gr = accumulate_gradients(model, data[:2]), accumulate_gradients(model, data[2:])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n = sum(p.numel() for p in params.values())
    wagle = build_mask(model, "wagle", 0.4, gf, gr, gamma=1e-3, chunk_size=5)
    want = top_ratio_mask(attribution_scores(params, gf, gr, 1e-3), 0.4)
    assert list(wagle) == ["emb.weight", "head.weight", "head.bias"]
    assert all(torch.equal(wagle[k], want[k]) for k in want) and sum(int(m.sum()) for m in wagle.values()) == int(n * 0.4)
    assert mask_density(build_mask(model, "dense", 0.1)) == 1.0
    r1, r2 = build_mask(model, "random", 0.3, seed=5), build_mask(model, "random", 0.3, seed=5)
    assert all(torch.equal(r1[k], r2[k]) for k in r1) and mask_density(r1) == int(n * 0.3) / n
    assert not all(torch.equal(r1[k], v) for k, v in build_mask(model, "random", 0.3, seed=6).items())
    assert random_scores({"x": (2, 3)}, 1)["x"].shape == (2, 3)
    with pytest.raises(ValueError, match="gradient"):
        build_mask(model, "wagle", 0.5, gf)


def test_save_load_round_trip_and_mismatch_errors(tmp_path):
    model = Tiny()
    mask = build_mask(model, "random", 0.5, seed=3)
    path = tmp_path / "masks" / "wagle_mask.safetensors"
    save_mask(mask, path, metadata={"method": "random", "ratio": 0.5})
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    back = load_mask(path, model)
    assert list(back) == list(mask) and all(torch.equal(back[k], mask[k]) for k in mask)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"method": "random", "ratio": "0.5"}
    other = nn.Linear(4, 7)  # "weight"/"bias" names: nothing matches
    with pytest.raises(ValueError, match="missing .*unexpected"):
        load_mask(path, other)
    save_mask({**mask, "head.bias": torch.ones(8, dtype=torch.bool)}, path)
    with pytest.raises(ValueError, match=r"head\.bias \(8,\) != \(7,\)"):
        load_mask(path, model)
    save_mask({**mask, "extra": torch.ones(1, dtype=torch.bool)}, path)
    with pytest.raises(ValueError, match="extra"):
        load_mask(path, {n: p for n, p in model.named_parameters() if p.requires_grad})


def test_config_validates(tmp_path):
    cfg = WAGLEConfig(output_dir=str(tmp_path))
    assert (cfg.objective, cfg.mask_method, cfg.mask_ratio, cfg.gamma, cfg.npo_beta) == ("graddiff", "wagle", 0.95, 1e-6, 0.1)
    for bad in ({"objective": "ga"}, {"mask_method": "wanda"}, {"mask_ratio": 1.2}, {"gamma": 0.0}, {"attribution_batches": 0}):
        with pytest.raises(ValueError):
            WAGLEConfig(output_dir=str(tmp_path), **bad)
