"""Which channels each token keeps: its top-k over the whole FFN width, or top-n of every m.

Under tensor parallelism every rank holds a contiguous slice of the FFN channels. A token's global
top-k is found without moving activations: each rank proposes its local top-min(k, width) scores,
the proposals are all-gathered (k values per token and rank), and each rank keeps those of its
proposals that are among the k largest of all. The result equals the single-rank top-k (up to
ties), which is what makes a TP=2 run follow the TP=1 one. A rank therefore has min(k, width)
slots per token, of which only the ones it won are used; the others hold -1.

The n:m rule (MoC "2:8") needs no communication: groups of m channels never straddle two ranks
(config validation requires the per-rank width to be a multiple of m).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from effdist.kernels._common import use_triton
from effdist.kernels.nm_select import top_n_of_m
from effdist.kernels.topk_select import topk_select


# Up to this many rows topk_channels runs effdist.kernels.topk_select, beyond it torch.topk (see there).
TOPK_SELECT_MAX_ROWS = 256


def index_dtype(width: int) -> torch.dtype:
    """Channel indices are stored for backward: int16 where the width allows, else int32."""
    return torch.int16 if width <= torch.iinfo(torch.int16).max else torch.int32


def topk_channels(scores: torch.Tensor, k: int, tp_group=None) -> torch.Tensor:
    """scores [N, W_local] -> channel index per slot [N, min(k, W_local)], -1 where unused.

    The selection is over the global width (all ranks of `tp_group`); it carries no gradient.
    """
    n, width = scores.shape
    slots = min(k, width)
    with torch.no_grad():
        world = dist.get_world_size(tp_group) if tp_group is not None else 1
        if world == 1 and use_triton(scores) and n <= TOPK_SELECT_MAX_ROWS:
            # Few rows (decode): the threshold-search kernel (effdist.kernels.topk_select), 14.6 us of GPU
            # time for a 5632-wide row on an H100 where torch.topk took 24 us (H200). Many rows: torch.topk,
            # 0.56 ms for 16k x 2816 against the kernel's 0.89 ms (H100, 2026-12-05).
            return topk_select(scores, slots)[0].to(index_dtype(width))
        values, idx = torch.topk(scores, slots, dim=-1, sorted=False)
        if world == 1:
            return idx.to(index_dtype(width))
        rank = dist.get_rank(tp_group)
        proposals = [torch.empty_like(values) for _ in range(world)]
        dist.all_gather(proposals, values.contiguous(), group=tp_group)
        candidates = torch.cat(proposals, dim=-1)  # [N, world * slots], rank r's block at r*slots
        winners = torch.topk(candidates, min(k, candidates.shape[-1]), dim=-1, sorted=False).indices
        won = torch.zeros_like(candidates, dtype=torch.bool).scatter_(1, winners, True)
        mine = won[:, rank * slots:(rank + 1) * slots]
        return torch.where(mine, idx, torch.full_like(idx, -1)).to(index_dtype(width))


def n_of_m_channels(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The n largest scores of every m consecutive channels: [N, W] -> [N, W / m * n] indices."""
    with torch.no_grad():
        return top_n_of_m(scores, n, m, index_dtype(scores.shape[1]))
