"""Tiny models built locally, for tests and the `tiny` recipes.

``build_tiny(arch, out_dir)`` trains a 512-token byte-level BPE tokenizer on generated text and builds a
randomly initialised ~0.1M-parameter causal LM around it (a DeepSeek-V3 MoE among them),
then writes both with ``save_pretrained``. Everything is seeded, so every build is byte-for-byte the same
model and tokenizer, and nothing is downloaded.

``tiny_model_path(arch)`` builds once into ``cache_dir()/tiny/<arch>`` and returns that folder. Several
processes may ask at once (``accelerate launch`` starts one per rank), so a build runs under a file lock,
in a temporary sibling folder that is renamed into place only when complete (``build_once``): a folder
at the final path is always a whole checkpoint. ``posttrain.recipes.smollm2`` uses the same helper.

torch, transformers and tokenizers are imported inside the builders: a cached model is found without them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock  # a dependency of huggingface_hub, so always installed with transformers

from posttrain.paths import cache_dir

logger = logging.getLogger(__name__)

ARCHS = ("llama", "qwen3", "deepseek_v3", "qwen3_moe", "qwen2_moe", "mixtral", "gpt2", "gpt_neox")

# Bump when the tokenizer, template or configs below change: cached builds with another stamp are rebuilt.
BUILD_VERSION = 1
STAMP_FILE = "posttrain_build.json"

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, 3
PAD_ID, EOS_ID = 0, 3  # a chat turn ends with <|im_end|>, so that is what generation stops on

# ChatML, without a default system prompt. The assistant reply and its <|im_end|> sit inside
# {% generation %} markers, so TRL's SFT `assistant_only_loss=True` uses the template as is (and trains
# the stop token); the markers render nothing otherwise.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

_WORDS = (
    "the a an and or but if then so because of to in on at for with from by about as is are was were be been "
    "what who where when why how which this that these those it they we you he she I me my your our their "
    "answer question number sum total add plus minus times equals result first second next last step think "
    "good bad yes no true false cat dog tree house water sun moon book river city road car apple bread "
    "red blue green small large long short happy sad fast slow hot cold new old up down left right "
    "say tell ask give take make find know see come go run walk read write learn teach help work play "
    "user assistant model reply please thanks hello world France Paris capital country"
).split()


# ---------------------------------------------------------------------------------------------------------
# Building once, safely across processes


def build_once(final_dir: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """Make ``final_dir`` by calling ``build(tmp_dir)`` at most once across concurrent processes.

    The lock makes the other ranks wait instead of repeating a long build; the temporary sibling plus
    rename means a crash mid-build leaves only a stray ``.tmp-*`` folder, never a half-built ``final_dir``.
    A stale or incomplete ``final_dir`` (``is_complete`` false) is replaced.
    """
    final_dir = Path(final_dir)
    if is_complete(final_dir):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final_dir.parent / f".{final_dir.name}.lock")):
        if is_complete(final_dir):  # another process finished it while we waited
            return final_dir
        tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
        try:
            build(tmp)
            if not is_complete(tmp):  # never rename an incomplete build into place, where it would look cached
                raise RuntimeError(
                    f"building {final_dir} left an incomplete folder: {sorted(p.name for p in tmp.iterdir())}"
                )
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; the cache may be shared
            if final_dir.exists():  # stale (older BUILD_VERSION) or damaged: move it aside, then swap
                old = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
                os.replace(final_dir, old / final_dir.name)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final_dir


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def _corpus(seed: int = 0, n_lines: int = 1200) -> list[str]:
    """Deterministic training text: chat-like word salad plus arithmetic Q&A, so digits and numbers get merges."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 2 == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            op = rng.choice("+-*")
            c = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"What is {a} {op} {b}? The answer is {c}.")
        else:
            words = rng.choices(_WORDS, k=rng.randint(4, 12))
            lines.append(" ".join(words).capitalize() + rng.choice(".?!"))
    return lines


def build_tokenizer():
    """Train the 512-token byte-level BPE and wrap it as a ``PreTrainedTokenizerFast`` with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------------------------------------------------
# Models


# what every config around the tiny tokenizer sets: its vocabulary and special ids, no BOS, tied embeddings
TOKENIZER_IDS = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)


def tiny_config(arch: str, **overrides):
    """The config of the tiny ``arch`` model, with ``overrides`` (any config field) applied."""
    config = _config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _config(arch: str):
    from transformers import (
        DeepseekV3Config,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MixtralConfig,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,  # rotary, so this costs no parameters; leaves room for SFT max_length
        tie_word_embeddings=True,
        **TOKENIZER_IDS,
    )
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if arch == "gpt2":
        # GPT-2 (SparsePO's own family): Conv1D layers, fused q/k/v, learned positions (hence the short
        # n_positions: 256 x 64 weights), ln_1 / ln_2 / ln_f. Dropout off, as the other tiny models.
        return GPT2Config(
            n_embd=64,
            n_inner=128,
            n_layer=2,
            n_head=4,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **TOKENIZER_IDS,
        )
    if arch == "gpt_neox":
        # GPT-NeoX / Pythia (SparsePO's own family): fused per-head q/k/v, parallel residual, untied head.
        return GPTNeoXConfig(**{**common, "tie_word_embeddings": False})
    if arch == "qwen3":
        return Qwen3Config(num_key_value_heads=2, head_dim=16, **common)
    if arch == "qwen3_moe":
        # Softmax top-k routing without a bias and with its own aux loss (router_aux_loss_coef 0.001): the MoE whose
        # router posttrain patches for aux-loss-free balancing (trainers/moe_balance.py install_expert_bias).
        return Qwen3MoeConfig(
            num_key_value_heads=2,
            head_dim=16,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            **common,
        )
    if arch == "qwen2_moe":
        # Qwen2-MoE (Qwen1.5-MoE): softmax routing plus a gated shared expert; patched like Qwen3-MoE.
        return Qwen2MoeConfig(
            num_key_value_heads=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            qkv_bias=True,
            **common,
        )
    if arch == "mixtral":
        # Mixtral: softmax top-2 routing, always renormalised; its checkpoints name the MoE block
        # ``block_sparse_moe`` while transformers 5.24 builds it as ``mlp`` (renamed on save and load).
        return MixtralConfig(
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, **{**common, "intermediate_size": 32}
        )
    # DeepSeek-V3: the one small MoE whose router keeps a selection-only bias (e_score_correction_bias),
    # which the aux-loss-free balancing method updates (transformers 5.24 ``DeepseekV3TopkRouter``).
    return DeepseekV3Config(
        num_key_value_heads=4,
        moe_intermediate_size=32,
        first_k_dense_replace=0,  # every layer is MoE
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        routed_scaling_factor=1.0,
        **common,
    )


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; valid: {', '.join(ARCHS)}")


def init_model(config, seed: int = 0, dtype=None):
    """``AutoModelForCausalLM.from_config(config)`` (fp32 unless ``dtype``), randomly initialised from ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    # fork_rng: seed the init without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def make_tiny(arch: str, seed: int = 0):
    """The tiny ``arch`` model (fp32, seeded init) and its tokenizer, in memory."""
    _check_arch(arch)
    tokenizer = build_tokenizer()
    model = init_model(_config(arch), seed)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model, tokenizer


def save_pretrained_on_any_rank(model, out_dir) -> None:
    """``model.save_pretrained(out_dir)`` from whichever rank calls it. Once torch.distributed is initialised,
    transformers 5.24 writes the config and weights on rank 0 only (``should_save_on_this_rank``), silently;
    the cache builders run on whichever rank takes the lock first, which is rank 1 about half the time."""
    model.should_save_on_this_rank = lambda is_main_process: True  # shadows the mixin's method, this call only
    try:
        model.save_pretrained(out_dir)
    finally:
        del model.should_save_on_this_rank


def build_tiny(arch: str, out_dir, seed: int = 0) -> Path:
    """Build the tiny ``arch`` model and its tokenizer and ``save_pretrained`` both into ``out_dir``."""
    model, tokenizer = make_tiny(arch, seed)
    out_dir = Path(out_dir)
    save_pretrained_on_any_rank(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / STAMP_FILE).write_text(json.dumps({"arch": arch, "seed": seed, "version": BUILD_VERSION}))
    return out_dir


def _is_complete(d: Path) -> bool:
    try:
        stamp = json.loads((d / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return stamp.get("version") == BUILD_VERSION and all((d / f).is_file() for f in files)


def tiny_model_path(arch: str) -> Path:
    """The cached tiny ``arch`` checkpoint under ``cache_dir()/tiny/<arch>``, built on first use."""
    _check_arch(arch)
    final = cache_dir() / "tiny" / arch
    if not _is_complete(final):
        logger.info("building tiny %s model into %s", arch, final)
    return build_once(final, lambda tmp: build_tiny(arch, tmp), _is_complete)
