"""Exact global top-k over many tensors without sorting them: radix select on order-preserving integer keys.

``top_ratio_mask(scores, ratio)`` marks the int(n * ratio) largest of all n entries of a dict of float tensors. The
k-th largest is found by radix select over 8-bit histograms of order-preserving integer keys, chunk by chunk (4 passes
for float32 scores, 8 for float64), never by sorting or concatenating all entries: memory stays one chunk's keys
beside the scores. Ties at the threshold go to the earliest entries in (dict order, row-major) order, i.e. exactly a
*stable* descending sort. With a process group the scores are each rank's shards (ZeRO-3's partitioning) and the
histograms are summed over ranks, so every rank gets its part of the mask of the whole tensors. WAGLE's phase 1 is
its user (``trainers/wagle.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.trainers.runtime import sum_over_ranks


def _keys(x, wide):
    """Order-preserving integer keys of floats: a < b iff key(a) < key(b); -0.0 is mapped to +0.0 first."""
    x = x.to(torch.float64 if wide else torch.float32)
    if torch.isnan(x).any():
        raise ValueError("NaN in the mask scores")
    bits = torch.where(x == 0, torch.zeros_like(x), x).view(torch.int64 if wide else torch.int32)
    return bits ^ ((bits >> (63 if wide else 31)) & (2**63 - 1 if wide else 2**31 - 1))


def _chunks(tensor, size):
    flat = tensor.reshape(-1)
    return [flat[i : i + size] for i in range(0, flat.numel(), size)]


def top_ratio_mask(
    scores: dict[str, Tensor], ratio: float, chunk_size: int = 2**24, group: object | None = None
) -> dict[str, Tensor]:
    """{name: bool mask}, True for the global top int(n * ratio) scores over all tensors together, exactly.

    The k-th largest score is found by radix select: one 256-bin histogram of the next 8 key bits per pass, over
    chunks of ``chunk_size`` entries, restricted to the entries that share the high bits found so far. Entries
    above it are all kept; entries equal to it are kept in (dict order, row-major) order until k are taken.

    ``group`` (a torch.distributed process group, e.g. ``torch.distributed.group.WORLD``): ``scores`` are this
    rank's shards, each a contiguous piece of its flattened tensor, rank r's piece before rank r + 1's (ZeRO-3's
    partitioning). Counts and histograms are summed over the ranks, and ties are taken in the order (name, rank,
    entry): every rank gets its part of the mask of the whole tensors, entry for entry (a collective: all ranks,
    same names in the same order)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1] (got {ratio})")

    def total(t):  # over the shards of all ranks, or of this process alone
        return t if group is None else sum_over_ranks(t, group)

    local = torch.tensor(
        [sum(s.numel() for s in scores.values()), sum(int(torch.isnan(s).sum()) for s in scores.values())]
    )
    n, nans = total(local).tolist()
    if nans:
        raise ValueError("NaN in the mask scores")
    k = int(n * ratio)
    if k == 0 or k == n:
        return {name: torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device) for name, s in scores.items()}
    wide = any(s.dtype == torch.float64 for s in scores.values())
    width = 64 if wide else 32
    prefix, need = 0, k  # need: rank of the k-th largest key among the keys that share the prefix
    for shift in range(width - 8, -1, -8):
        top = shift == width - 8
        hist = torch.zeros(256, dtype=torch.int64)
        for s in scores.values():
            for chunk in _chunks(s, chunk_size):
                key = _keys(chunk, wide)
                if not top:
                    key = key[(key >> (shift + 8)) == prefix]
                digit = ((key >> shift) & 255) ^ (128 if top else 0)  # top byte: sign flipped, so unsigned order
                hist += torch.bincount(digit.long(), minlength=256).cpu()
        hist = total(hist)
        at_least = hist.flip(0).cumsum(0)  # at_least[i]: entries whose digit >= 255 - i
        i = int(torch.searchsorted(at_least, need))
        digit = 255 - i
        need -= int(at_least[i] - hist[digit])
        prefix = digit - 128 if top else prefix * 256 + digit
    threshold = prefix  # and the first `need` ties of the global order are kept
    ties = torch.tensor(
        [sum(int((_keys(c, wide) == threshold).sum()) for c in _chunks(s, chunk_size)) for s in scores.values()],
        dtype=torch.int64,
    )
    if group is None:
        before = ties.cumsum(0) - ties  # ties in the tensors before each one
    else:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        table = torch.zeros(world, len(ties), dtype=torch.int64)
        table[rank] = ties
        table = total(table)  # [rank, tensor]: every rank's tie counts
        before = table.sum(0).cumsum(0) - table.sum(0) + table[:rank].sum(0)  # earlier tensors, then earlier ranks
    quota = (need - before).clamp(min=0).minimum(ties).tolist()  # ties this rank keeps in each tensor
    masks = {}
    for (name, s), left in zip(scores.items(), quota):
        parts = []
        for chunk in _chunks(s, chunk_size):
            key = _keys(chunk, wide)
            keep, tie = key > threshold, key == threshold
            if left > 0:
                take = tie & (tie.cumsum(0) <= left)
                left -= int(take.sum())
                keep |= take
            parts.append(keep)
        masks[name] = (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=s.device)).view(s.shape)
    return masks
