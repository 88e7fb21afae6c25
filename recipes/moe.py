"""MoE load balancing in any recipe: the ``moe_*`` keys, their checks, and the wiring of the callback.

Any LLM recipe (sft, dpo, kto, reward, grpo, rloo, thr_grpo, constrained_rlhf, ...) may add:

    moe_balance: aux_free        # none | aux_free | aux_loss; absent: off (no callback, stock training)
    moe_bias_rate: 1.0e-3        # u; 0 freezes the biases (the usual choice for RL/DPO of a pretrained MoE)
    moe_bias_on_softmax: false   # allow a rate > 0 on softmax routers (Qwen2/3-MoE, Mixtral); use u ~ 4e-3 / E there
    moe_bias_rule: sign          # sign | proportional | decaying
    moe_bias_decay_power: 0.5    # decaying rule only
    moe_bias_decay_steps: 1.0    # decaying rule only
    moe_aux_loss_coef: 1.0e-3    # aux_loss only
    moe_aux_loss_scope: batch    # aux_loss only: batch (all tokens; Qwen/Mixtral's own loss) | sequence (DeepSeek-V3)
    moe_ignore_padding: true     # pads out of the loads
    moe_log_per_layer: true      # per-layer MaxVio / load entropy / bias norm in the logs

They are the fields of ``MoEBalanceConfig`` and are kept beside the method's config (``Recipe.moe``), like a custom
optimizer. ``none`` measures and logs the loads without changing anything; ``aux_free`` updates the selection-only
expert biases after every optimizer step (``MoEBalanceCallback``); ``aux_loss`` adds a balance loss with frozen
biases: the model's own (``load_balancing_loss_func`` via TRL's ``router_aux_loss_coef``) for Qwen2-MoE, Qwen3-MoE,
Mixtral and other configs that carry ``router_aux_loss_coef`` and ``num_experts``; posttrain's ``RouterAuxLoss``
(a documented autograd hook, ``trainers/moe_balance.py``) for DeepSeek-V3 / GLM-4-MoE, which have none, for
trainers without the TRL field (reward), and for ``moe_aux_loss_scope: sequence`` (DeepSeek-V3's sequence-wise
loss; the models' own losses are batch-wise) on every model.

When each mistake is caught:

* parsing the recipe (``load_recipe``; nothing loaded): types and values, keys the chosen mode ignores, ``moe_*``
  keys without ``moe_balance``, ``moe_*`` keys on an auxiliary (non-LLM) method, TRL's ``router_aux_loss_coef``
  next to ``moe_balance`` (two coefficients for one loss), reentrant gradient checkpointing (it hides the training
  forward from the load counter), ``use_vllm`` with ``aux_free`` (the biases are buffers; TRL's vLLM weight sync
  sends ``named_parameters()`` only, so vLLM would route with stale biases).
* before the model loads (``build_trainer``, after the data; reads the checkpoint's ``config.json`` only): the model
  has no experts; ``aux_free`` on a model type whose router has neither a selection-only bias nor a patch;
  ``aux_free`` with a rate > 0 on a softmax router (Qwen2-MoE, Qwen3-MoE, Mixtral) without ``moe_bias_on_softmax:
  true`` (the bias and its rate 1e-3 are for sigmoid scores; Megatron-LM refuses a bias on softmax; see
  ``softmax_bias_refusal`` in trainers/moe_balance.py); TRL's ``router_aux_loss_coef`` on a DeepSeek-V3-style
  config, which crashes inside TRL (``add_fused_lm_head``'s forward reads ``num_experts``, which
  ``DeepseekV3Config`` lacks) -- this one is checked for every recipe, with or without ``moe_*`` keys.
* after the model loads (right after the trainer is built, before ``train()`` wraps it in DDP/DeepSpeed): the router
  modules themselves. Only a model type missing from the lists below (e.g. a remote-code MoE) gets here unchecked.

``trainers.moe_balance`` and transformers (torch) are imported inside the functions that use them, so that
``recipes.config`` can import this module at its top and parsing a recipe loads neither.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from posttrain import RecipeError, UserError
from posttrain.key_groups import pop_key_group

# model types whose router already adds e_score_correction_bias for top-k selection only (transformers 5.24 source)
NATIVE_BIAS_TYPES = ("deepseek_v3", "glm4_moe")
# model types whose router install_expert_bias patches (SOFTMAX_ROUTERS)
PATCHABLE_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral")
# MoE model types whose router has no selection-only bias and no patch (checked: deepseek_v2 and olmoe have no
# e_score_correction_bias; ernie4_5_moe keeps it as a parameter of a separate module). Other unknown types are checked
# after the model loads (a router with an e_score_correction_bias buffer is taken as DeepSeek-style).
NO_BIAS_TYPES = ("deepseek_v2", "olmoe", "ernie4_5_moe")
_ONLY_AUX_FREE = (
    "moe_bias_rate",
    "moe_bias_rule",
    "moe_bias_decay_power",
    "moe_bias_decay_steps",
    "moe_bias_on_softmax",
)
_ONLY_AUX_LOSS = ("moe_aux_loss_coef", "moe_aux_loss_scope")
_MOE_HINT = (
    "use tiny:deepseek_v3, a DeepSeek-V3 / GLM-4-MoE / Qwen2-MoE / Qwen3-MoE / Mixtral checkpoint, or turn a "
    "dense Llama-style model into one with `posttrain moe upcycle`"
)


def moe_keys() -> tuple[str, ...]:
    from posttrain.trainers.moe_balance import MoEBalanceConfig

    return tuple(f.name for f in dataclasses.fields(MoEBalanceConfig))


def parse_moe_keys(values: dict[str, Any], sources: dict[str, str], source: str, method: str, task: str, coerce) -> Any:
    """Pop the ``moe_*`` keys from ``values`` and return a ``MoEBalanceConfig``, or None when there are none.

    ``coerce(value, type, key, where)`` is the recipe's type check. Raises ``UserError`` (via ``coerce`` too).
    """
    from posttrain.trainers.moe_balance import MoEBalanceConfig

    refusal = None
    if task == "aux":
        refusal = (
            "moe_* keys ({keys}) apply to LLM methods with a mixture-of-experts model; method "
            f"'{method}' has no model; remove them"
        )
    kwargs = pop_key_group(
        values,
        sources,
        source,
        names=moe_keys(),
        config_cls=MoEBalanceConfig,
        switch="moe_balance",
        switch_fix="add `moe_balance: aux_free` (or aux_loss / none), or remove the moe_* keys (without moe_balance "
        "the run is stock)",
        refusal=refusal,
        coerce=coerce,
    )
    if kwargs is None:
        return None
    try:
        cfg = MoEBalanceConfig(**kwargs)
    except ValueError as err:
        raise RecipeError(f"{sources.get('moe_balance', source)}: invalid MoE balancing settings: {err}") from err
    ignored = [
        k
        for k in kwargs
        if (k in _ONLY_AUX_FREE and cfg.moe_balance != "aux_free")
        or (k in _ONLY_AUX_LOSS and cfg.moe_balance != "aux_loss")
    ]
    if ignored:
        needs = {k: "aux_free" if k in _ONLY_AUX_FREE else "aux_loss" for k in ignored}
        listed = ", ".join(f"{k} (needs moe_balance: {v})" for k, v in needs.items())
        raise RecipeError(
            f"{sources.get(ignored[0], source)}: {listed} "
            f"has no effect with moe_balance: {cfg.moe_balance}; remove it or change moe_balance"
        )
    return cfg


def check_moe_recipe(recipe_values: dict[str, Any], config, moe, sources: dict[str, str], source: str) -> None:
    """Combinations that cannot work, known from the recipe alone (run by build_recipe)."""
    if moe is None:
        return
    if "router_aux_loss_coef" in recipe_values:
        where = sources.get("router_aux_loss_coef", source)
        if moe.moe_balance == "aux_loss":
            raise RecipeError(
                f"{where}: router_aux_loss_coef and moe_balance: aux_loss both set the balance loss; "
                "keep moe_aux_loss_coef (posttrain routes it to the model's own loss where there is one)"
            )
        if moe.moe_balance == "aux_free" and recipe_values["router_aux_loss_coef"] not in (0, 0.0, None):
            raise RecipeError(
                f"{where}: router_aux_loss_coef={recipe_values['router_aux_loss_coef']} with moe_balance: "
                "aux_free: the Qwen/Mixtral aux loss recomputes an unbiased top-k and fights the bias; "
                "remove router_aux_loss_coef (aux_free sets it to 0)"
            )
    if moe.moe_balance == "aux_free" and getattr(config, "use_vllm", False):
        # TRL 1.16 VLLMGeneration.sync_weights streams _iter_named_params (named_parameters()): the biases never
        # reach vLLM
        raise RecipeError(
            f"{sources.get('use_vllm', source)}: use_vllm with moe_balance: aux_free: the expert biases "
            "are buffers and TRL's vLLM weight sync sends parameters only, so vLLM would route the rollouts "
            "with stale biases; set use_vllm: false, or moe_balance: none (loads logged, stock routing)"
        )
    kwargs = getattr(config, "gradient_checkpointing_kwargs", None) or {}
    if getattr(config, "gradient_checkpointing", False) and kwargs.get("use_reentrant"):
        raise RecipeError(
            f"{sources.get('gradient_checkpointing_kwargs', source)}: moe_balance with reentrant gradient "
            "checkpointing: the training forward runs under no_grad there and the expert loads would "
            "count generation/reference passes or nothing; drop use_reentrant (the default is false)"
        )


@dataclass
class MoEPlan:
    mode: str
    model_type: str
    aux_hook: bool  # posttrain's RouterAuxLoss (aux_loss mode without a model-native loss)


def _text_config(model_path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot read the model config of {model_path}: {str(err).splitlines()[0]} (an upcycled "
            "model not made yet? see the recipe's first comment line: `posttrain moe upcycle ...`)"
        ) from err
    return cfg.get_text_config()


def is_moe_config(text_config) -> bool:
    return any(
        isinstance(getattr(text_config, a, None), int) and getattr(text_config, a) > 0
        for a in ("num_experts_per_tok", "n_routed_experts", "num_local_experts", "num_experts")
    )


def prepare_moe(recipe, model_path: str) -> MoEPlan | None:
    """Checks that need the model's config (not its weights), and the TRL settings they imply; before the model loads.

    Sets ``recipe.config.router_aux_loss_coef``: 0 for aux_free (Qwen's default 0.001 would otherwise stay on), the
    recipe's ``moe_aux_loss_coef`` for aux_loss on a model with its own balance loss. Returns None without ``moe_*``.
    """
    config, moe = recipe.config, recipe.moe
    coef = getattr(config, "router_aux_loss_coef", None)
    if moe is None and not coef:
        return None
    name = recipe.model_args.model_name_or_path
    text = _text_config(model_path, bool(getattr(config, "trust_remote_code", False)))
    model_type = getattr(text, "model_type", "?")
    if coef and hasattr(text, "output_router_logits") and not hasattr(text, "num_experts"):
        raise UserError(
            f"{recipe.source}: router_aux_loss_coef={coef} on {name} ({type(text).__name__}): TRL's "
            f"aux-loss path reads config.num_experts, which {type(text).__name__} lacks (AttributeError "
            "inside trl add_fused_lm_head); use `moe_balance: aux_loss` (posttrain adds the balance loss "
            "itself) or remove router_aux_loss_coef"
        )
    if moe is None:
        return None
    mode = moe.moe_balance
    if not is_moe_config(text):
        raise UserError(
            f"{recipe.source}: moe_balance: {mode} needs a mixture-of-experts model, but {name} is a "
            f"{model_type} model without experts; {_MOE_HINT}"
        )
    if mode == "aux_free" and model_type in NO_BIAS_TYPES:
        raise UserError(
            f"{recipe.source}: moe_balance: aux_free on {name} ({model_type}): its router has no "
            "selection-only expert bias and posttrain has no patch for it; supported model types: "
            f"{', '.join(NATIVE_BIAS_TYPES + PATCHABLE_TYPES)}; or use moe_balance: aux_loss / none"
        )
    if mode == "aux_free" and model_type in PATCHABLE_TYPES and moe.moe_bias_rate > 0 and not moe.moe_bias_on_softmax:
        from posttrain.trainers.moe_balance import softmax_bias_refusal

        experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
        raise UserError(
            f"{recipe.source}: " + softmax_bias_refusal(f"{name} ({model_type})", experts, moe.moe_bias_rate)
        )
    native_aux = hasattr(text, "router_aux_loss_coef") and hasattr(text, "num_experts")
    has_field = hasattr(config, "router_aux_loss_coef")
    aux_hook = False
    if mode == "aux_free" and has_field:
        config.router_aux_loss_coef = 0.0
    elif mode == "aux_loss":
        if native_aux and has_field and moe.moe_aux_loss_scope == "batch":  # the model's own loss is batch-wise
            config.router_aux_loss_coef = moe.moe_aux_loss_coef
        else:
            aux_hook = True
            if has_field:
                config.router_aux_loss_coef = 0.0
    return MoEPlan(mode, model_type, aux_hook)


def attach_moe(trainer, recipe, plan: MoEPlan):
    """Hook the routers of ``trainer.model`` (install the Qwen/Mixtral bias patch for aux_free) and register the
    callback; run right after the trainer is built, i.e. before ``train()`` wraps the model (DDP registers the bias
    buffers present at wrap time; DeepSpeed keeps them fp32 and does not partition them). Returns the callback."""
    from posttrain.trainers.moe_balance import MoEBalanceCallback
    from posttrain.trainers.moe_routers import find_routers

    model = trainer.model
    if not find_routers(model):
        raise UserError(
            f"{recipe.source}: moe_balance: {plan.mode}: {type(model).__name__} has no MoE router module "
            f"(no *TopkRouter); {_MOE_HINT}"
        )
    try:
        # count_no_grad=False: generation, reference and old-log-prob passes (no_grad) stay out of the loads
        callback = MoEBalanceCallback(recipe.moe, model=model, count_no_grad=False, aux_loss_hook=plan.aux_hook)
    except NotImplementedError as err:
        raise UserError(f"{recipe.source}: moe_balance: aux_free: {err}; or use moe_balance: aux_loss") from err
    callback.attach(trainer)
    trainer.moe_balance = callback
    return callback
