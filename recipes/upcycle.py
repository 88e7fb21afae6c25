"""Sparse upcycling: a dense Llama-style checkpoint -> a DeepSeek-V3-style MoE (``posttrain moe upcycle``).

    posttrain moe upcycle SRC DST --experts N --top_k K [--shared_experts 1] [--noise 0.01] [--seed 0]
                                  [--dense_layers 0] [--n_group 1] [--topk_group 1]

SRC: ``tiny:llama``, a local folder or a hub id / ``HuggingFaceTB/SmolLM2-135M-Instruct`` (offline copy), resolved like
a recipe's ``model_name_or_path``. DST: a new folder that ``AutoModelForCausalLM.from_pretrained`` loads offline.

**Architecture: GLM-4-MoE (``Glm4MoeForCausalLM``), not DeepSeek-V3.** DeepSeek-V3's attention is MLA: queries and keys
go through low-rank projections, the latent key/value is RMS-normalised (``kv_a_layernorm``, not linear) and the
rotary part of the key is one head shared by all heads. Llama's grouped-query attention (rotary on every dimension of
every key head) cannot be written in that form, so no weight copy keeps the dense model's function. GLM-4-MoE in
transformers 5.24 is DeepSeek-V3's MoE block on Llama-style attention: with ``attention_bias=False``,
``use_qk_norm=False`` and ``partial_rotary_factor=1`` its attention, RMSNorms, rotary embedding (``rotate_half``) and
decoder layer are Llama's, line for line, while its MoE is DeepSeek-V3's: ``Glm4MoeTopkRouter`` has sigmoid
affinities, the ``e_score_correction_bias`` buffer used for (group-limited) top-k selection only, weights gathered from
the unbiased scores and renormalised, ``routed_scaling_factor``, and a shared expert beside the routed ones. So the
upcycled model is balanced by ``moe_balance: aux_free`` natively (no patch), and loads without remote code. Qwen2-MoE
(gated shared expert, attention biases), Qwen3-MoE (q/k norms) and Mixtral (no shared expert, softmax router without
a bias) were the alternatives; each changes the function or needs the bias patch.

**Weights.** Attention, norms, embeddings and the LM head are copied. In each MoE layer (all but the first
``dense_layers``, which keep the dense MLP): every routed expert is the dense MLP (gate and up stacked into
``gate_up_proj``), plus Gaussian noise of standard deviation ``noise`` x the std of each copied matrix (0: exact
copies); the shared expert is ``shared_experts`` exact copies side by side; the router weight is N(0,
``initializer_range``) and the bias zeros. The dense MLP's output is split evenly between the two paths: the shared
expert's down projection is scaled by 1 / (2 S) and ``routed_scaling_factor`` = 1/2, so that with identical experts,
whatever the router picks (its gate weights sum to 1), shared + routed = MLP(x): at noise 0 the MoE computes the
dense model's logits (up to float rounding; tested). ``shared_experts`` >= 1: the block always has a shared expert.

transformers, TRL and ``recipes.models`` are imported inside ``upcycle`` and ``moe_config``: the state-dict maths
here needs torch alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from posttrain import UserError
from posttrain.paths import not_a_folder

PROVENANCE = "posttrain_upcycle.json"


def _check_source(cfg) -> None:
    problems = []
    if cfg.model_type not in ("llama", "mistral"):
        problems.append(f"model_type {cfg.model_type!r} (expected llama)")
    if getattr(cfg, "attention_bias", False):
        problems.append("attention_bias=True")
    if getattr(cfg, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if getattr(cfg, "sliding_window", None):
        problems.append(f"sliding_window={cfg.sliding_window}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act}")
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp={cfg.pretraining_tp}")
    if problems:
        raise UserError(
            f"upcycle: the source must be a dense Llama-style model (GQA attention without biases, SiLU "
            f"gated MLP); this one has {', '.join(problems)}"
        )


def moe_config(
    dense_cfg,
    experts: int,
    top_k: int,
    shared_experts: int = 1,
    dense_layers: int = 0,
    n_group: int = 1,
    topk_group: int = 1,
):
    """The ``Glm4MoeConfig`` of the upcycled model (see the module docstring)."""
    from transformers import Glm4MoeConfig

    if experts < 1 or not 1 <= top_k <= experts:
        raise UserError(f"upcycle: need 1 <= top_k ({top_k}) <= experts ({experts})")
    if shared_experts < 1:
        raise UserError(
            f"upcycle: shared_experts must be >= 1 (got {shared_experts}): the DeepSeek-V3 / GLM-4-MoE "
            "block always has a shared expert"
        )
    if not 0 <= dense_layers < dense_cfg.num_hidden_layers:
        raise UserError(f"upcycle: dense_layers must be in [0, {dense_cfg.num_hidden_layers - 1}] (got {dense_layers})")
    if experts % n_group or not 1 <= topk_group <= n_group or top_k > topk_group * (experts // n_group):
        raise UserError(
            f"upcycle: {experts} experts in n_group={n_group} groups, topk_group={topk_group}, "
            f"top_k={top_k} is not a valid group-limited routing"
        )
    if n_group > 1 and experts // n_group < 2:
        raise UserError("upcycle: group-limited routing scores a group by its top-2 experts: need >= 2 per group")
    rope = dict(
        getattr(dense_cfg, "rope_parameters", None)
        or {"rope_type": "default", "rope_theta": getattr(dense_cfg, "rope_theta", 1e4)}
    )
    rope["partial_rotary_factor"] = 1.0  # Llama rotates every dimension (GLM's default is 0.5)
    head_dim = getattr(dense_cfg, "head_dim", None) or dense_cfg.hidden_size // dense_cfg.num_attention_heads
    return Glm4MoeConfig(
        vocab_size=dense_cfg.vocab_size,
        hidden_size=dense_cfg.hidden_size,
        intermediate_size=dense_cfg.intermediate_size,  # the dense layers, if any
        moe_intermediate_size=dense_cfg.intermediate_size,  # each expert is a full copy of the MLP
        num_hidden_layers=dense_cfg.num_hidden_layers,
        num_attention_heads=dense_cfg.num_attention_heads,
        num_key_value_heads=dense_cfg.num_key_value_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=dense_cfg.max_position_embeddings,
        initializer_range=dense_cfg.initializer_range,
        rms_norm_eps=dense_cfg.rms_norm_eps,
        tie_word_embeddings=dense_cfg.tie_word_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        use_qk_norm=False,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_shared_experts=shared_experts,
        routed_scaling_factor=0.5,
        n_group=n_group,
        topk_group=topk_group,
        first_k_dense_replace=dense_layers,
        norm_topk_prob=True,
        num_nextn_predict_layers=0,
        bos_token_id=dense_cfg.bos_token_id,
        eos_token_id=dense_cfg.eos_token_id,
        pad_token_id=dense_cfg.pad_token_id,
    )


def upcycle_state_dict(dense_sd: dict, cfg, noise: float = 0.01, seed: int = 0) -> dict:
    """The MoE state dict from the dense one (fp32): see the module docstring for what goes where."""
    g = torch.Generator().manual_seed(seed)
    E, S = cfg.n_routed_experts, cfg.n_shared_experts
    out = {}
    for key, value in dense_sd.items():
        if ".mlp." not in key:
            out[key] = value.float().clone()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (dense_sd[p + f"{n}_proj.weight"].float() for n in ("gate", "up", "down"))
        if i < cfg.first_k_dense_replace:
            out.update(
                {
                    p + "gate_proj.weight": gate.clone(),
                    p + "up_proj.weight": up.clone(),
                    p + "down_proj.weight": down.clone(),
                }
            )
            continue

        def copies(w):
            stacked = w.unsqueeze(0).repeat(E, *([1] * w.dim()))
            if noise > 0:
                stacked = stacked + noise * w.std() * torch.randn(stacked.shape, generator=g)
            return stacked

        out[p + "experts.gate_up_proj"] = copies(torch.cat([gate, up], dim=0))  # (E, 2I, H): gate rows first
        out[p + "experts.down_proj"] = copies(down)  # (E, H, I)
        out[p + "gate.weight"] = torch.randn(E, cfg.hidden_size, generator=g) * cfg.initializer_range
        out[p + "gate.e_score_correction_bias"] = torch.zeros(E)
        out[p + "shared_experts.gate_proj.weight"] = gate.repeat(S, 1)
        out[p + "shared_experts.up_proj.weight"] = up.repeat(S, 1)
        out[p + "shared_experts.down_proj.weight"] = down.repeat(1, S) * (0.5 / S)
    return out


def upcycle(
    src: str,
    dst,
    experts: int,
    top_k: int,
    shared_experts: int = 1,
    noise: float = 0.01,
    seed: int = 0,
    dense_layers: int = 0,
    n_group: int = 1,
    topk_group: int = 1,
) -> Path:
    """Write the upcycled model and the source's tokenizer to ``dst``; returns ``dst``."""
    from transformers import AutoConfig, AutoModelForCausalLM, Glm4MoeForCausalLM
    from trl import ModelConfig

    from posttrain.recipes.models import load_tokenizer, resolve_model_path

    if noise < 0:
        raise UserError(f"upcycle: noise must be >= 0 (got {noise})")
    dst = Path(dst)
    # checked before the source loads: the folder is only written at the end
    problem = not_a_folder(dst)
    if problem:
        raise UserError(f"upcycle: destination {dst}{problem}; pick a new folder")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"upcycle: {dst} exists and is not empty; pick a new folder")
    path = resolve_model_path(src)
    try:
        dense_cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:  # a missing folder, an unknown or uncached hub id, an unreadable config
        # transformers reads a name that is no folder as a hub id, and its complaint about the id's form misleads
        reason = (
            "no such folder, and no such model on the hub or in the HF cache"
            if not Path(path).exists()
            else (str(err).strip().splitlines() or [type(err).__name__])[0]
        )
        raise UserError(
            f"upcycle: cannot load the source model {src!r} ({reason}); give tiny:llama, a model folder or a hub id"
        ) from None
    _check_source(dense_cfg)
    cfg = moe_config(dense_cfg, experts, top_k, shared_experts, dense_layers, n_group, topk_group)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = upcycle_state_dict(dense.state_dict(), cfg, noise, seed)
    generation_config = dense.generation_config
    del dense
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG stream as it was
        model = Glm4MoeForCausalLM(cfg)
    missing = set(model.state_dict()) - set(state)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise RuntimeError(f"upcycle: key mismatch; missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = generation_config
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    load_tokenizer(ModelConfig(model_name_or_path=path)).save_pretrained(dst)
    for extra in ("chat_template.jinja",):
        if (Path(path) / extra).is_file() and not (dst / extra).exists():
            shutil.copy(Path(path) / extra, dst / extra)
    (dst / PROVENANCE).write_text(
        json.dumps(
            {
                "source": src,
                "source_path": str(path),
                "architecture": "Glm4MoeForCausalLM",
                "experts": experts,
                "top_k": top_k,
                "shared_experts": shared_experts,
                "noise": noise,
                "seed": seed,
                "dense_layers": dense_layers,
                "n_group": n_group,
                "topk_group": topk_group,
                "routed_scaling_factor": cfg.routed_scaling_factor,
                "parameters": sum(t.numel() for t in state.values()),
            },
            indent=1,
        )
        + "\n"
    )
    return dst
