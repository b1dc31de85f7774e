"""The model chunks a pipeline rank owns, built from a Schedule's placement.

Chunk c holds a contiguous run of decoder layers (`layer_partition`, the split the simulator's memory model
uses: as even as possible, earlier chunks take the remainder); chunk 0 also holds the embedding and the last
chunk the final norm, the output layer and the loss. The placement decides the rank of each chunk: plain (one
per rank), interleaved (chunk c on rank c % p) or V (rank r holds chunks r and 2p-1-r, so embedding and loss
both live on rank 0). Every chunk is a standalone megatron GPTModel (TransformerConfig with
pipeline_model_parallel_size=1), because megatron's own layer layout is round-robin and cannot express V.

Global layer numbers. megatron derives a layer's ``layer_number`` and its checkpoint offset from
``get_transformer_layer_offset(config)``, which for a pp=1 config is 0. Each chunk's config therefore carries
``effdist_layer_offset`` (its first global layer index) and ``num_layers`` = the model's layer count, and
a patch of effdist.runtime.megatron_patches makes megatron's function honour that attribute (build_gpt builds
every chunk). So layer
numbers and sharded_state_dict keys are global (``decoder.layers`` with the layer's global offset), the
output-layer init scale is the full model's, and checkpoints compare across pipeline layouts.

Initial weights. On CPU the chunks are copied from the full model built exactly as a pp=1 run builds it (same
seed, same generator stream), so a pipelined run starts from the pp=1 model. On GPU building the full model on
every rank would not fit large models; each chunk is initialised from its own seed (train.seed + 100 * chunk,
as Megatron-LM offsets seeds per pipeline stage) and the RNG is restored afterwards.

What a chunk is made of is the caller's: the functions here take a `ChunkBuilder`,
``build(layer_indices, pre_process, post_process, linears) -> GPTModel`` (effdist.model.gpt.gpt_chunk_builder
binds the config, dtype and device), and know nothing of the config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from megatron.core.models.gpt import GPTModel

from effdist.config import ConfigError
from effdist.model.spec import DEFAULT_LINEARS, LinearImpl
from effdist.pipeline.ir import Placement
from effdist.pipeline.memory_model import layer_partition

# build(layer_indices, pre_process, post_process, linears): the GPTModel holding those global layers.
ChunkBuilder = Callable[[list, bool, bool, LinearImpl], GPTModel]

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")




@dataclass(frozen=True)
class ChunkLayout:
    """Which layers each chunk holds and which rank holds each chunk."""

    placement: Placement
    layers: tuple[range, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.layers)

    @property
    def num_layers(self) -> int:
        return sum(len(r) for r in self.layers)

    def is_first(self, chunk: int) -> bool:
        return chunk == 0

    def is_last(self, chunk: int) -> bool:
        return chunk == self.num_chunks - 1

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        return self.placement.chunks_of(rank)

    def describe(self) -> str:
        """One line per chunk, e.g. ``chunk 0 on rank 0: layers 0-2 (3) + embedding``."""
        lines = []
        for c, layers in enumerate(self.layers):
            span = f"{layers.start}-{layers.stop - 1}" if len(layers) > 1 else f"{layers.start}"
            extra = (" + embedding" if self.is_first(c) else "") + (" + final norm, output layer, loss" if self.is_last(c) else "")
            lines.append(f"chunk {c} on rank {self.placement.rank_of(c)}: layers {span} ({len(layers)}){extra}")
        sizes = sorted({len(r) for r in self.layers})
        if len(sizes) > 1:
            lines.append(f"uneven split: {sum(len(r) for r in self.layers)} layers over {self.num_chunks} chunks "
                         f"({'/'.join(str(len(r)) for r in self.layers)})")
        return "\n".join(lines)


def chunk_layout(num_layers: int, placement: Placement) -> ChunkLayout:
    try:
        parts = layer_partition(num_layers, placement.num_chunks)
    except ValueError as e:
        raise ConfigError(f"model.num_layers = {num_layers}: {e}") from None
    return ChunkLayout(placement, tuple(parts))


def build_chunk(build: ChunkBuilder, layout: ChunkLayout, chunk: int,
                linears: LinearImpl = DEFAULT_LINEARS) -> GPTModel:
    """The GPTModel of one chunk, with global layer numbers (see the module docstring)."""
    model = build(list(layout.layers[chunk]), layout.is_first(chunk), layout.is_last(chunk), linears)
    model.effdist_chunk = chunk
    return model


def full_model_name(layout: ChunkLayout, chunk: int, name: str) -> str:
    """The name in the pp=1 model of parameter `name` of chunk `chunk` (decoder layer indices become global)."""
    match = _LAYER_KEY.match(name)
    if not match:
        return name
    return f"decoder.layers.{layout.layers[chunk][int(match.group(1))]}.{name[match.end():]}"


def copy_from_full_model(chunk_models: Sequence[torch.nn.Module], chunk_ids: Sequence[int], layout: ChunkLayout,
                         full: torch.nn.Module) -> None:
    source = dict(full.named_parameters())
    with torch.no_grad():
        for model, chunk in zip(chunk_models, chunk_ids):
            for name, p in model.named_parameters():
                src = source[full_model_name(layout, chunk, name)]
                if src.shape != p.shape:
                    raise RuntimeError(f"chunk {chunk} parameter {name}: shape {tuple(p.shape)} vs {tuple(src.shape)} in "
                                       "the full model")
                p.copy_(src)


def build_model_chunks(build: ChunkBuilder, layout: ChunkLayout, rank: int, device: torch.device, seed: int,
                       linears: LinearImpl = DEFAULT_LINEARS, init: str = "auto") -> list[GPTModel]:
    """The chunks pipeline rank `rank` owns, in forward order (`seed`: train.seed, for per-chunk init).

    init: "full-model" copies every chunk from the pp=1 model built here (exactly a pp=1 run's initial weights),
    "per-chunk" seeds each chunk on its own, "auto" picks full-model on CPU and per-chunk on GPU.
    """
    if init == "auto":
        init = "full-model" if device.type == "cpu" else "per-chunk"
    if init not in ("full-model", "per-chunk"):
        raise ValueError(f"init = {init!r}: use 'full-model', 'per-chunk' or 'auto'")
    chunk_ids = layout.chunks_of(rank)
    if init == "full-model":
        full = build(list(range(layout.num_layers)), True, True, DEFAULT_LINEARS)
        after_full = torch.get_rng_state()
        models = [build_chunk(build, layout, c, linears) for c in chunk_ids]
        copy_from_full_model(models, chunk_ids, layout, full)
        # Leave the generator where a pp=1 run leaves it after building its model.
        torch.set_rng_state(after_full)
        del full
        return models
    return _build_seeded_per_chunk(build, layout, chunk_ids, device, seed, linears)


def _build_seeded_per_chunk(build, layout, chunk_ids, device, seed, linears) -> list[GPTModel]:
    from megatron.core import tensor_parallel

    devices = [device] if device.type == "cuda" else []
    models = []
    with torch.random.fork_rng(devices=devices):
        for c in chunk_ids:
            torch.manual_seed(seed + 100 * c)
            if device.type == "cuda":
                tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * c)
            models.append(build_chunk(build, layout, c, linears))
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)  # back to the runtime's RNG streams
    return models
