"""WAGLE: worked examples, the exact chunked global top-k, the model-side helpers, and the trainer
(reduces to plain GradDiff/NPO/PO at an all-ones mask, clip -> mask -> step, exact resume, 2-process DDP and
DeepSpeed ZeRO-2/3 runs, the phase-1 memory budget).

The worked examples (six parameter entries, ratio 0.5, gamma 1e-3 and 1e-6; the NPO forget term at CE 2.0 vs 1.5,
beta 0.1) were computed with numpy from the official code's rules (OPTML-Group/WAGLE at
31275e87c03e0f23bb01413eb3f19eada4a404d0: ``src/unlearn/generate_mask.py``, score type ``snip_advanced``,
S = (theta - g_r / gamma) * g_f ranked globally by |S|; ``src/unlearn/GA.py`` ``NPO_FT``); the equations are in the
docstring of ``posttrain/trainers/wagle.py``. They are not values from the paper (arXiv 2410.17509).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from support import free_port, method_state, one_process_launch, two_process_launch
from torch import nn
from transformers import AutoModelForCausalLM, TrainerCallback, get_scheduler

from posttrain.cli import main
from posttrain.data.unlearning import REFUSALS, collate, encode_example, stream_indices
from posttrain.recipes.config import load_recipe
from posttrain.recipes.tiny import tiny_model_path
from posttrain.recipes.train import build_trainer
from posttrain.trainers.gradient_masks import (
    accumulate_gradients,
    apply_gradient_mask,
    load_mask,
    mask_density,
    save_mask,
)
from posttrain.trainers.method_state import STATE_FILE
from posttrain.trainers.radix_topk import top_ratio_mask
from posttrain.trainers.runtime import latest_checkpoint
from posttrain.trainers.wagle import (
    MASK_FILE,
    WAGLEConfig,
    attribution_scores,
    build_mask,
    graddiff_loss,
    magnitude_scores,
    npo_forget_term,
    npo_loss,
    po_loss,
    random_scores,
    snip_scores,
)

torch.set_num_threads(1)

# --- worked example: six entries, ratio 0.5 (k = 3) -------------------------------------------------------
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
        out[name] = keep[i : i + s.numel()].view(s.shape)
        i += s.numel()
    return out, flat, k


def random_score_dict(g, ties):
    shapes = [
        tuple(torch.randint(1, 6, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist())
        for _ in range(int(torch.randint(1, 25, (1,), generator=g)))
    ]
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


def _sharded_topk_rank(rank, world, port, seed, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(seed)
    results = []
    for trial in range(12):  # the same draws on every rank
        scores = random_score_dict(g, ties=trial % 2 == 0)
        ratio, chunk = float(torch.rand(1, generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        # ZeRO-3's layout: rank r holds entries [r c, (r + 1) c) of each flattened tensor (c = ceil(numel / world)),
        # so the last ranks may hold a shorter piece or nothing
        shards = {
            n: x.reshape(-1)[rank * -(-x.numel() // world) : (rank + 1) * -(-x.numel() // world)]
            for n, x in scores.items()
        }
        results.append(top_ratio_mask(shards, ratio, chunk_size=chunk, group=dist.group.WORLD))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_sharded_mask_equals_the_mask_of_the_whole_tensors(tmp_path):
    import torch.multiprocessing as mp

    seed, world = torch.seed() % 2**31, 3
    mp.spawn(_sharded_topk_rank, args=(world, free_port(), seed, str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    g = torch.Generator().manual_seed(seed)
    for trial in range(12):
        scores = random_score_dict(g, ties=trial % 2 == 0)
        ratio, chunk = float(torch.rand(1, generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        want = top_ratio_mask(scores, ratio, chunk_size=chunk)
        for name in scores:
            got = torch.cat([per_rank[r][trial][name] for r in range(world)])
            assert torch.equal(got, want[name].reshape(-1)), f"seed {seed} trial {trial} {name}"


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
        assert m.nonzero().flatten().tolist() == sorted(
            torch.sort(x, descending=True, stable=True).indices[:k].tolist()
        )


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
    return [
        {"input_ids": torch.randint(0, 7, (2, 3), generator=g), "labels": torch.randint(0, 7, (2, 3), generator=g)}
        for _ in range(n)
    ]


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


def test_bf16_model_gradient_sums_are_float32_sums():
    """A bf16 model's phase-1 sums are float32 sums of its batch gradients, as documented, not bf16 sums
    accumulated in ``.grad`` (the official code's rounding), with or without ``to_cpu``."""
    torch.manual_seed(0)
    model, data = Tiny().to(torch.bfloat16), batches(16, 5)
    model.eval()
    reference, in_bf16 = {}, {}
    for b in data:  # float32 sum of the per-batch bf16 gradients, in batch order
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                reference[n] = reference[n] + p.grad.float() if n in reference else p.grad.float()
                in_bf16[n] = in_bf16[n] + p.grad if n in in_bf16 else p.grad.clone()
    model.zero_grad(set_to_none=True)
    # the test means something: summing 16 batches in bf16 rounds away what float32 keeps
    assert any(not torch.equal(in_bf16[n].float(), reference[n]) for n in reference)
    for to_cpu in (False, True):
        got = accumulate_gradients(model, data, to_cpu=to_cpu, grad_scale=2.0)
        assert list(got) == list(reference) and all(p.grad is None for p in model.parameters())
        for n in reference:
            assert got[n].dtype == torch.float32, (to_cpu, n, got[n].dtype)
            assert torch.equal(got[n], 2.0 * reference[n]), (to_cpu, n, (got[n] - 2.0 * reference[n]).abs().max())


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
    assert all(torch.equal(wagle[k], want[k]) for k in want) and sum(int(m.sum()) for m in wagle.values()) == int(
        n * 0.4
    )
    assert mask_density(build_mask(model, "dense", 0.1)) == 1.0
    r1, r2 = build_mask(model, "random", 0.3, seed=5), build_mask(model, "random", 0.3, seed=5)
    assert all(torch.equal(r1[k], r2[k]) for k in r1) and mask_density(r1) == int(n * 0.3) / n
    assert not all(torch.equal(r1[k], v) for k, v in build_mask(model, "random", 0.3, seed=6).items())
    assert random_scores({"x": (2, 3)}, 1)["x"].shape == (2, 3)
    with pytest.raises(ValueError, match="gradient"):
        build_mask(model, "wagle", 0.5, gf)


PHASE_ONE_MEMORY = """
import ctypes, sys, threading, time
ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: big blocks come from mmap and go back on free,
ctypes.CDLL("libc.so.6").mallopt(-1, 0)      # M_TRIM_THRESHOLD: so the resident set follows the live tensors
import psutil, torch
from posttrain.trainers.gradient_masks import accumulate_gradients
from posttrain.trainers.wagle import build_mask
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(4)])  # 64 MiB, resident
batches = [torch.randn(8, 2048) for _ in range(8)]
proc, peak, running = psutil.Process(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.0005)
start = peak[0] = proc.memory_info().rss
thread = threading.Thread(target=sample)
thread.start()
loss = lambda m, x: m(x).pow(2).mean()
forget, retain = accumulate_gradients(model, batches, loss), accumulate_gradients(model, batches, loss)
build_mask(model, "wagle", 0.5, forget, retain, 1e-6, chunk_size=2**20, consume=sys.argv[1] == "consume")
running[0] = False
thread.join()
print((peak[0] - start) / sum(p.numel() * 4 for p in model.parameters()))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="needs glibc's mallopt, so the resident set follows live memory")
def test_phase_one_stays_within_three_parameter_copies():
    # the budget set for phase 1: model + 3 fp32 copies. Live by design: the forget sum and the retain sum in .grad (2
    # copies), plus one weight's gradient and the top-k chunk keys. Scores made beside the sums would cost a 4th copy.
    def copies(mode):
        out = subprocess.run(
            [sys.executable, "-c", PHASE_ONE_MEMORY, mode],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return float(out.stdout.split()[-1])

    consumed, beside = copies("consume"), copies("keep")
    assert 2.0 <= consumed <= 3.0, consumed  # both sums were live at once, and nothing more than a copy on top
    assert beside > consumed + 0.75, (beside, consumed)  # the probe sees a parameter-sized copy


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
    assert (cfg.objective, cfg.mask_method, cfg.mask_ratio, cfg.gamma, cfg.npo_beta) == (
        "graddiff",
        "wagle",
        0.95,
        1e-6,
        0.1,
    )
    for bad in (
        {"objective": "ga"},
        {"mask_method": "wanda"},
        {"mask_ratio": 1.2},
        {"gamma": 0.0},
        {"attribution_batches": 0},
    ):
        with pytest.raises(ValueError):
            WAGLEConfig(output_dir=str(tmp_path), **bad)


# --- the trainer -----------------------------------------------------------------------------------------

# 100 samples: 10 authors, forget10 = 1 author = 10 rows (one batch of 10 = every forget row, so a step's forget CE
# does not depend on the sampler's order), retain = 8 authors = 80 rows (the stream matters)
ALL_FORGET = {
    "per_device_train_batch_size": 10,
    "optim": "adamw_torch",
    "weight_decay": 0.0,
    "learning_rate": 1e-3,
    "max_steps": 3,
    "logging_steps": 1,
}


def wagle_trainer(tmp_path, **overrides):
    return build_trainer(load_recipe("wagle/tiny", {**ALL_FORGET, "output_dir": str(tmp_path), **overrides}))


def reference_run(trainer, steps, mask=None, mask_before_clip=False):
    """A hand-written loop: the objective of the docstring of ``posttrain/trainers/wagle.py`` (GradDiff / NPO / PO)
    on the trainer's batches, HF's AdamW and linear warmup schedule, clip_grad_norm_, then the mask, then the step.
    Returns the final parameters."""
    args = trainer.args
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"))
    model.train()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")).eval()
    pad = trainer.processing_class.pad_token_id
    forget = collate(trainer.forget_rows, pad, "refusal_" if args.objective == "po" else "")
    if args.optim == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = get_scheduler("linear", optimizer, args.get_warmup_steps(steps), steps)
    for k in range(steps):
        f_ce, r_ce = model(**forget).loss, model(**trainer.retain_batch(k * args.per_device_train_batch_size)).loss
        if args.objective == "graddiff":
            loss = -f_ce + args.retain_weight * r_ce
        elif args.objective == "npo":
            with torch.no_grad():
                ref_ce = ref(**forget).loss
            loss = (
                -(2 / args.npo_beta) * nn.functional.logsigmoid(args.npo_beta * (f_ce - ref_ce))
                + args.retain_weight * r_ce
            )
        else:
            loss = f_ce + args.retain_weight * r_ce
        loss.backward()
        if mask is not None and mask_before_clip:
            apply_gradient_mask(model, mask)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if mask is not None and not mask_before_clip:
            apply_gradient_mask(model, mask)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return dict(model.named_parameters())


def max_param_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize(
    "objective, neutral",
    [
        ("graddiff", {"mask_method": "dense", "retain_weight": 0.5}),  # lambda != 1: the trainer must apply it
        ("npo", {"mask_ratio": 1.0}),
        ("po", {"mask_method": "random", "mask_ratio": 1.0}),
    ],
)
def test_an_all_ones_mask_is_plain_unlearning_step_for_step(objective, neutral, tmp_path):
    trainer = wagle_trainer(tmp_path, objective=objective, **neutral)
    trainer.train()
    assert trainer.mask_info["density"] == 1.0
    got = dict(trainer.model.named_parameters())
    assert max_param_diff(got, reference_run(trainer, 3)) < 2e-6
    # the comparison can fail: the reference loop without the retain term ends elsewhere
    trainer.args.retain_weight = 0.0
    assert max_param_diff(got, reference_run(trainer, 3)) > 1e-4


def test_the_mask_is_applied_after_clipping_and_before_the_step(tmp_path):
    # max_grad_norm far below the gradient norm (~2), so clipping is active; SGD, because Adam's update would
    # hardly notice a rescaled gradient, so the order could not show
    trainer = wagle_trainer(tmp_path, mask_ratio=0.3, max_grad_norm=0.05, optim="sgd", learning_rate=0.5)
    trainer.train()
    got = dict(trainer.model.named_parameters())
    assert max_param_diff(got, reference_run(trainer, 3, trainer.mask)) < 2e-6
    # masking first shrinks the norm that clipping divides by (a little: the mask keeps the large gradients)
    assert max_param_diff(got, reference_run(trainer, 3, trainer.mask, mask_before_clip=True)) > 2e-5
    assert max_param_diff(got, reference_run(trainer, 3)) > 1e-4  # and the mask does something


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_weights_stay_put_without_weight_decay(weight_decay, tmp_path):
    trainer = wagle_trainer(tmp_path, mask_ratio=0.5, weight_decay=weight_decay, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        frozen, free = ~trainer.mask[name], trainer.mask[name]
        if weight_decay == 0.0:
            assert torch.equal(p[frozen], before[name][frozen]), name
        assert frozen.any() or free.all()
    moved = sum(int((p != before[n]).sum()) for n, p in trainer.model.named_parameters())
    updated = sum(int(m.sum()) for m in trainer.mask.values())
    if weight_decay == 0.0:
        assert 0.9 * updated < moved <= updated  # the updated entries move (but a zero gradient may stay)
    else:  # AdamW's decoupled decay still shrinks the masked weights of decayed tensors (official behaviour)
        assert moved > updated


def test_mask_is_saved_logged_and_reloaded_from_mask_path(tmp_path):
    trainer = wagle_trainer(tmp_path / "a", mask_ratio=0.4, max_steps=1)
    trainer.train()
    saved = load_mask(tmp_path / "a" / MASK_FILE, trainer.model)
    assert all(torch.equal(saved[n], trainer.mask[n]) for n in saved)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all({"forget_loss", "retain_loss", "mask_density"} <= set(e) for e in logs)
    assert logs[0]["mask_density"] == pytest.approx(0.4, abs=1e-5)
    # a random mask from the file is used as it is (no phase 1), and a file for another model is refused
    random_mask = build_mask(trainer.model, "random", 0.7, seed=3)
    save_mask(random_mask, tmp_path / "r.safetensors")
    again = wagle_trainer(tmp_path / "b", mask_path=str(tmp_path / "r.safetensors"), max_steps=1)
    again.train()
    assert all(torch.equal(again.mask[n], random_mask[n]) for n in random_mask)
    save_mask({"x": torch.ones(3, dtype=torch.bool)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not match the model"):
        wagle_trainer(tmp_path / "c", mask_path=str(tmp_path / "bad.safetensors"), max_steps=1).train()


def test_wagle_mask_differs_from_its_baselines_and_depends_on_gamma(tmp_path):
    masks = {}
    for key, extra in {
        "wagle": {},
        "wagle_1e-2": {"gamma": 1e-2},
        "snip": {"mask_method": "snip"},
        "magnitude": {"mask_method": "magnitude"},
    }.items():
        t = wagle_trainer(tmp_path / key, mask_ratio=0.5, **extra)
        t.setup_mask()
        masks[key] = torch.cat([m.reshape(-1) for m in t.mask.values()])
        assert masks[key].float().mean().item() == pytest.approx(0.5, abs=1e-5)
    keys = list(masks)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not torch.equal(masks[a], masks[b]), (a, b)
    # phase 1 by hand: summed CE gradients of the forget rows and of the paired retain stream batch
    model = t.model
    pad = t.processing_class.pad_token_id
    gf = accumulate_gradients(model, [collate(t.forget_rows, pad)])
    gr = accumulate_gradients(model, [t.retain_batch(0)])
    want = top_ratio_mask(attribution_scores(dict(trainer_params(model)), gf, gr, 1e-6), 0.5)
    assert torch.equal(masks["wagle"], torch.cat([m.reshape(-1) for m in want.values()]))


def trainer_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def test_retain_stream_is_a_pure_function_of_the_position():
    first = stream_indices(7, 3, 0, 7)
    assert sorted(first) == list(range(7)) and sorted(stream_indices(7, 3, 7, 7)) == list(range(7))
    assert stream_indices(7, 3, 0, 7) != stream_indices(7, 3, 7, 7)  # a new permutation every cycle
    whole = stream_indices(7, 3, 0, 30)
    assert whole == [x for s in range(0, 30, 4) for x in stream_indices(7, 3, s, min(4, 30 - s))]


def test_examples_are_tokenized_with_the_answer_as_the_only_target(tmp_path):
    trainer = wagle_trainer(tmp_path, objective="po", max_steps=1)
    tok = trainer.processing_class
    prompt = [{"role": "user", "content": "Who?"}]
    item = encode_example(tok, prompt, [{"role": "assistant", "content": "Me."}])
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    n = len(tok(head, add_special_tokens=False)["input_ids"])
    assert item["labels"][:n] == [-100] * n and item["labels"][n:] == item["input_ids"][n:]
    assert tok.decode(item["input_ids"][n:]).startswith("Me.<|im_end|>")
    plain = encode_example(tok, "Q:", " A.", prompt_template="<{prompt}>")
    assert tok.decode(plain["input_ids"]) == "<Q:> A.<|im_end|>" and plain["labels"][0] == -100
    text = encode_example(tok, "Just text.")
    assert text["labels"] == text["input_ids"]
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, prompt, [{"role": "assistant", "content": "Me."}], max_length=n)
    row = trainer.forget_rows[9]  # PO: refusal targets, REFUSALS[i % 8]
    assert REFUSALS[9 % len(REFUSALS)] in tok.decode([t for t in row["refusal_labels"] if t != -100])


class _Killed(Exception):
    pass


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise _Killed


@pytest.mark.parametrize("objective", ["graddiff", "npo"])
def test_resume_continues_the_same_run_with_the_same_mask(objective, tmp_path):
    # per-device batch 4 over 10 forget rows: the forget sampler and the retain stream position both matter
    opts = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "mask_ratio": 0.5,
        "objective": objective,
        "per_device_train_batch_size": 4,
    }
    argv = [f"--{k}={v}" for k, v in opts.items()]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", "wagle/tiny", "--output_dir", str(full), *argv]) == 0
    trainer = build_trainer(load_recipe("wagle/tiny", {**opts, "output_dir": str(cut)}))
    trainer.add_callback(KillAfterSave())
    with pytest.raises(_Killed):
        trainer.train()
    assert latest_checkpoint(cut).name == "checkpoint-2"
    assert method_state(cut / "checkpoint-2")["trainer"]["micro_step"] == 2
    assert main(["train", "wagle/tiny", "--output_dir", str(cut), "--resume", *argv]) == 0

    def history(folder):
        return {
            e["step"]: e for e in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "loss" in e
        }

    a, b = history(full / "checkpoint-4"), history(cut / "checkpoint-4")
    for step in (3, 4):
        for key in ("loss", "forget_loss", "retain_loss"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6), (step, key)
    x, y = AutoModelForCausalLM.from_pretrained(full), AutoModelForCausalLM.from_pretrained(cut)
    for (n, p), q in zip(x.named_parameters(), y.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    for folder in ("checkpoint-2", "checkpoint-4", "."):
        m1, m2 = (method_state(run / folder)["trainer"]["mask"] for run in (full, cut))
        assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert all(torch.equal(m1[k], m) for k, m in load_mask(cut / MASK_FILE).items())  # the artifact for mask_path
    # the mask of the checkpoint, not a new one built from the resumed weights
    rebuilt = build_trainer(load_recipe("wagle/tiny", {**opts, "output_dir": str(tmp_path / "rebuilt")}))
    rebuilt.model.load_state_dict(AutoModelForCausalLM.from_pretrained(cut / "checkpoint-2").state_dict())
    rebuilt.setup_mask()
    assert not all(torch.equal(rebuilt.mask[k], m1[k]) for k in m1)


def test_checkpoint_without_wagle_state_is_refused(tmp_path):
    opts = {"max_steps": 2, "save_strategy": "steps", "save_steps": 2, "output_dir": str(tmp_path)}
    build_trainer(load_recipe("wagle/tiny", opts)).train()
    (tmp_path / "checkpoint-2" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        build_trainer(load_recipe("wagle/tiny", {**opts, "max_steps": 4})).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-2")
        )


def _launch_helper(out, config=None):
    from support import ROOT

    program = (str(ROOT / "tests" / "helpers" / "wagle_distributed.py"), str(out))
    cmd = two_process_launch(config, *program) if config else one_process_launch(*program)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def one_process_and_ddp(tmp_path_factory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("wagle")
    _launch_helper(out / "one")
    _launch_helper(out / "ddp", "cpu_2proc.yaml")
    return load_file(str(out / "one" / "rank0.safetensors")), load_file(str(out / "ddp" / "rank0.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_2proc.yaml", "zero2.yaml", "zero3.yaml"])
def test_two_processes_share_one_mask_equal_to_the_one_process_mask(config, one_process_and_ddp, tmp_path):
    # DDP: phase 1 on the bare model, sums all-reduced, p.grad masked. ZeRO-2: the same phase 1, the mask applied to
    # this rank's flat fp32 partition. ZeRO-3: phase 1 through the engine (ranks pad to the same number of passes;
    # here 3 and 2 batches), each rank scoring its own pieces, one global threshold, the mask applied to the
    # sub-group partitions: the same mask as one process, entry for entry.
    from safetensors.torch import load_file

    one, ddp = one_process_and_ddp
    _launch_helper(tmp_path, config)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert one["batches"].item() == 5 and r0["batches"].item() == 3 and r1["batches"].item() == 2
    sums = [k for k in one if k.startswith(("gf/", "gr/"))]
    assert len(sums) == 2 * sum(k.startswith("mask/") for k in one)
    zero3 = config == "zero3.yaml"
    if zero3:  # each rank holds its own flat piece of every sum: rank 0 the first half, rank 1 the rest
        for key in sums:
            assert r0[key].numel() == -(-one[key].numel() // 2), key
            torch.testing.assert_close(torch.cat([r0[key], r1[key]]), one[key].reshape(-1), rtol=1e-5, atol=1e-7)
    for key in r1:  # (sums,) mask and weights: bit for bit the same on both ranks
        if key != "batches" and not (zero3 and key in sums):
            assert torch.equal(r0[key], r1[key]), key
    for key in (
        k for k in ddp if k.startswith("param/")
    ):  # DeepSpeed trains as DDP does: clip (unmasked norm), mask, step
        torch.testing.assert_close(r0[key], ddp[key], rtol=0, atol=1e-6)
    for key in sums if not zero3 else ():  # the sums of one process over the same 5 batches (a wrong rank
        torch.testing.assert_close(r0[key], one[key], rtol=1e-5, atol=1e-7)  # scaling would show here)
    masks = [k for k in one if k.startswith("mask/")]
    assert all(torch.equal(r0[k], one[k]) for k in masks)
    assert 0 < sum(int(one[k].sum()) for k in masks) < sum(one[k].numel() for k in masks)
    moved = {k: r0[f"param/{k[5:]}"] != r0[f"initial/{k[5:]}"] for k in masks}
    assert not any(moved[k][~r0[k]].any() for k in masks)  # weight decay 0: masked entries never move
    assert sum(int(moved[k][r0[k]].sum()) for k in masks) > 0.9 * sum(int(r0[k].sum()) for k in masks)  # the rest do


@pytest.mark.slow
@pytest.mark.parametrize("method", ["snip", "magnitude", "random"])
def test_zero3_baseline_masks_equal_the_one_process_masks(method, tmp_path):
    # the baselines on ZeRO-3 pieces too: fp32 master weights, the forget pieces, random_scores' draws sliced
    from support import ROOT

    def mask_of(name, launch):
        program = ["-m", "posttrain", "train", "wagle/tiny", "--mask_method", method, "--mask_ratio", "0.3"]
        cmd = launch(*program, "--max_steps", "1", "--output_dir", str(tmp_path / name))
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
        return load_mask(tmp_path / name / MASK_FILE)

    one = mask_of("one", one_process_launch)
    two = mask_of("two", lambda *program: two_process_launch("zero3.yaml", *program))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert 0 < sum(int(m.sum()) for m in one.values()) < sum(m.numel() for m in one.values())


def test_micro_batched_attribution_gives_the_batch_gradient():
    # pieces of a batch, each token-sum CE / the batch's answer tokens, sum to the gradient of the batch's
    # token-mean CE (what the official code differentiates), whatever the piece size
    from posttrain.trainers.wagle import _piece_loss, _pieces

    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    ids = torch.randint(0, 50, (5, 7))
    attention = torch.ones_like(ids)
    attention[1, 5:] = attention[3, 4:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :2] = -100  # prompt tokens
    batches = [{"input_ids": ids, "attention_mask": attention, "labels": labels}]
    whole = accumulate_gradients(model, batches)
    for size in (1, 2, 5):
        pieces = accumulate_gradients(model, _pieces(batches, size), loss_fn=_piece_loss)
        for name in whole:
            torch.testing.assert_close(pieces[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)


# --- wiring: the retain stream under data parallelism ------------------------------------------------------------


def test_ranks_read_disjoint_consecutive_retain_batches(tmp_path, monkeypatch):
    # Micro-step k of rank r reads the retain rows at position (k * world + r) * B of the shared retain stream: the
    # ranks together read the stream in order, none twice. Seen from rank 0 and rank 1 of a simulated 2-process run
    # (the accelerator's rank and world are the only inputs), over three micro-steps.
    from accelerate import Accelerator

    trainer = wagle_trainer(tmp_path)
    batch = trainer.args.per_device_train_batch_size
    positions = {}

    class Seen(Exception):
        pass

    def record(position):
        positions.setdefault(rank, []).append(position)
        raise Seen

    monkeypatch.setattr(trainer, "retain_batch", record)
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    for rank in (0, 1):
        monkeypatch.setattr(Accelerator, "process_index", property(lambda self, r=rank: r))
        trainer.micro_step = 0
        for _ in range(3):
            with pytest.raises(Seen):
                trainer.training_step(trainer.model, {})
            trainer.micro_step += 1  # the raise skipped the trainer's own increment
    assert positions == {0: [0, 2 * batch, 4 * batch], 1: [batch, 3 * batch, 5 * batch]}
