"""Where to hook a transformer's activations, per architecture: the hook points of MaPO-style activation masks.

``hook_points(model)`` finds, in each decoder layer, the MLP activation (``mlp``), the query / key / value
projections and the attention output before its projection (``attn``; a fused q/k/v projection is split the way
the model splits it), and the residual-stream points (``resid``: the two layer norms' outputs, the attention and
MLP blocks' outputs, the layer's output, the embeddings and the final norm), as the official hooks of SparsePO
(huawei-noah/HEBO, ``SparsePO/src/masks/hooks.py``) define them. Known layouts: Llama / Qwen / Mistral-style
decoders, GPT-2, GPT-NeoX (Pythia) and GPT-BigCode; another architecture whose modules have none of the known names
gets empty lists, which the caller reports. SparsePO's activation masks are the user (``trainers/sparsepo.py``).
"""

from __future__ import annotations

from torch import nn


def _first_attr(module, names):
    for name in names:
        if module is not None and isinstance(getattr(module, name, None), nn.Module):
            return getattr(module, name)
    return None


def _fused_qkv_split(attn, fused):
    """Split a fused q/k/v projection output into (q, k, v) the way the model does: GPT-2 and multi-query
    GPT-BigCode concatenate them, GPT-NeoX and multi-head GPT-BigCode interleave them per head ([head, 3 * head])."""
    if hasattr(attn, "head_size") and fused is getattr(attn, "query_key_value", None):  # GPT-NeoX
        return lambda o: o.view(*o.shape[:-1], -1, 3 * attn.head_size).chunk(3, dim=-1)
    if getattr(attn, "multi_query", None) is False:  # GPT-BigCode, multi-head
        return lambda o: o.view(*o.shape[:-1], -1, 3 * attn.head_dim).chunk(3, dim=-1)
    split = getattr(attn, "split_size", None) or getattr(attn, "embed_dim", None)
    kv_dim = getattr(attn, "kv_dim", split)
    return lambda o: o.split([split, kv_dim, kv_dim], dim=-1)


def hook_points(model: nn.Module) -> dict[str, list[tuple[str, nn.Module, str, object]]]:
    """MaPO hook points per type, as the official hooks (``src/masks/hooks.py`` and the patched GPT-2 / GPT-NeoX /
    GPT-BigCode models of huawei-noah/HEBO SparsePO): (name, module, 'output'|'input', split or None).

    - mlp: ``post_act``, the MLP activation's output;
    - attn: ``q``, ``k``, ``v`` (separate projections, or the fused GPT-2 / GPT-NeoX / GPT-BigCode projection
      split as the model splits it) and ``v_out``, the attention output before its output projection. The
      official ``post_rota_emb_q/k`` (after rotary) are functional, not modules, and are not hooked;
    - resid: ``input_ln_attn`` / ``post_ln_attn`` (the two layer-norm outputs), ``delta_attn`` / ``delta_mlp``
      (the attention and MLP blocks' outputs, what they add to the residual stream), ``post_mlp`` (the layer's
      output), ``post_emb`` (the embeddings, with positions where the model adds them) and ``post_ln_f``.

    Works for Llama / Qwen / Mistral-style decoders and GPT-2, GPT-NeoX (Pythia) and GPT-BigCode: the layers
    are the backbone's ModuleList of ``num_hidden_layers`` blocks. 'logits' is read from the chunked heads."""
    backbone = model.base_model
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    layers = next(
        (
            list(m)
            for m in backbone.children()
            if isinstance(m, nn.ModuleList) and len(m) and (n_layers is None or len(m) == n_layers)
        ),
        [],
    )
    points = {"mlp": [], "attn": [], "resid": []}
    for layer in layers:
        attn = _first_attr(layer, ("self_attn", "attn", "attention"))
        mlp = _first_attr(layer, ("mlp",))
        act = _first_attr(mlp, ("act_fn", "act", "activation_fn"))
        if act is not None:
            points["mlp"].append(("post_act", act, "output", None))
        separate = [(n, _first_attr(attn, (f"{n}_proj",))) for n in ("q", "k", "v")]
        fused = _first_attr(attn, ("c_attn", "query_key_value"))
        if all(m is not None for _, m in separate):
            points["attn"] += [(n, m, "output", None) for n, m in separate]
        elif fused is not None:
            points["attn"].append(("qkv", fused, "output", _fused_qkv_split(attn, fused)))
        out_proj = _first_attr(attn, ("o_proj", "c_proj", "dense", "out_proj"))
        if out_proj is not None:
            points["attn"].append(("v_out", out_proj, "input", None))
        for name, module, where in (
            ("input_ln_attn", _first_attr(layer, ("input_layernorm", "ln_1")), "output"),
            ("post_ln_attn", _first_attr(layer, ("post_attention_layernorm", "ln_2")), "output"),
            ("delta_attn", attn, "output"),
            ("delta_mlp", mlp, "output"),
            ("post_mlp", layer, "output"),
        ):
            if module is not None:
                points["resid"].append((name, module, where, None))
    # post_emb: after the positional embeddings where the model adds them (GPT-2 / BigCode: the dropout after wte + wpe)
    emb = _first_attr(backbone, ("drop", "emb_dropout", "embed_in", "embed_tokens"))
    final = _first_attr(backbone, ("norm", "ln_f", "final_layer_norm"))
    if emb is not None:
        points["resid"].append(("post_emb", emb, "output", None))
    if final is not None:
        points["resid"].append(("post_ln_f", final, "output", None))
    return points
