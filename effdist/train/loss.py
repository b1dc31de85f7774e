"""The training loss of one microbatch, as every engine computes it (the pipeline's last stage excepted:
its model input arrives from the previous stage)."""

from __future__ import annotations

import torch


def masked_loss_sum(model: torch.nn.Module, microbatch: dict[str, torch.Tensor],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the microbatch's unmasked tokens of the per-token loss in fp32, the fp32 loss mask).

    A sum, not a mean: callers divide by the tokens of the whole global batch, so that microbatches and
    data-parallel ranks with different numbers of unmasked tokens weigh each token equally.
    """
    tokens = microbatch["tokens"].to(device, non_blocking=True)
    labels = microbatch["labels"].to(device, non_blocking=True)
    mask = microbatch["loss_mask"].to(device, non_blocking=True).float()
    position_ids = microbatch["position_ids"].to(device, non_blocking=True)
    per_token = model(tokens, position_ids, None, labels=labels)
    return (per_token.float() * mask).sum(), mask
