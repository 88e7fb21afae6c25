"""MaxVio_global: how evenly an MoE model spreads an evaluation set's tokens over its experts (the ``moe_balance``
eval task; Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", arXiv 2408.15664).
The routing is counted with the trainer's own ``RoutingCounter``, so training logs and evaluation measure the same
thing.
"""

from __future__ import annotations

import torch

from posttrain.trainers.moe_balance import load_entropy, max_violation
from posttrain.trainers.moe_routers import RoutingCounter


@torch.no_grad()
def maxvio_global(model, tokenizer, texts, batch_size=8, max_length=512, device=None):
    """MaxVio_global of ``model`` on ``texts`` (Wang et al., arXiv 2408.15664): the loads over the whole set.

    Every text is tokenised (padded per batch of ``batch_size``, truncated to ``max_length``; pads are left out of
    the loads), run through the model in eval mode, and each MoE layer's token-expert assignments are summed over all
    batches. Returns ``{"maxvio_global": mean over layers of (max_i c_i - c_bar) / c_bar, "maxvio_global_max": worst
    layer, "load_entropy": mean over layers (nats), "per_layer": {layer: maxvio}, "loads": {layer: [c_i]},
    "tokens": tokens counted}``. The model's own routing is measured, biases included. ``device`` defaults to the
    device of the model's first parameter.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("maxvio_global needs at least one text")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = RoutingCounter(model, ignore_padding=True)
    tokens = 0
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            mask = enc.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else enc["input_ids"].numel()
            model(
                input_ids=enc["input_ids"].to(device),
                attention_mask=mask.to(device) if mask is not None else None,
                use_cache=False,
            )
        loads = [c.detach().cpu() for c in counter.counts]
    finally:
        counter.remove()
        model.train(was_training)
    per_layer = {name: max_violation(c) for name, c in zip(counter.names, loads)}
    return {
        "maxvio_global": sum(per_layer.values()) / len(per_layer),
        "maxvio_global_max": max(per_layer.values()),
        "load_entropy": sum(load_entropy(c) for c in loads) / len(loads),
        "per_layer": per_layer,
        "loads": {name: c.tolist() for name, c in zip(counter.names, loads)},
        "tokens": tokens,
    }
