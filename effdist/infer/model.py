"""A compact inference forward over the weights of a trained effdist model: prefill and cached decode.

The training model (megatron-core GPTModel) is built for training: tensor-parallel linears, [s, b, h]
layout, autograd bookkeeping, no cache that EPAS can use. This module holds the same weights in
plain tensors and computes the same function (tested: its logits equal GPTModel's, fp32, for region
0 and sharing regions), with:

* ``forward``: the whole sequence at once (SDPA, causal), as in training. No cache.
* ``prefill``: the same over the prompt, writing K (anchor layers) and V (all layers) into a
  `KVCache`; returns the logits of the last position only.
* ``decode_step``: one new token per sequence against the cache. An anchor computes its attention
  probabilities ``softmax(q K^T)`` once; each sharing layer below it has the same Q and K, hence the
  same probabilities, and only multiplies them with its own V cache: it reads no K and runs neither
  the Q/K projection nor RoPE nor a softmax. The step reads and writes only fixed tensors of the
  cache, so it can be captured as a CUDA graph (effdist.infer.graphs).

Weights: megatron's fused ``linear_qkv`` is interleaved per query group ([q heads of group g, k_g,
v_g] for each g); here it is regrouped as [all Q; all K; all V], so the V rows a sharing layer uses
are one contiguous block. SwiGLU ``linear_fc1`` is [gate; up]. The FFN of each layer is an
effdist.infer.ffn module of the trained kind (swiglu, relu2, topk, moc, elas): prefill and
``forward`` run its dense math (what the training module computes in eval mode); decode steps run
its sparse path, which reads only the FFN weight rows of the channels each token keeps
(``sparse_decode=False``: the dense math there too). RoPE is rotate-half with cos/sin
rounded to the activation dtype, as megatron's unfused RoPE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from effdist.infer.cache import KVCache, SharingPlan
from effdist.infer.ffn import FFN_KINDS, InferenceFFN, ffn_from_weights, random_ffn
from effdist.kernels.rmsnorm import rmsnorm

try:  # the Triton kernels need triton and a GPU; the torch references run elsewhere
    import triton  # noqa: F401

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover
    _HAVE_TRITON = False

SUPPORTED_FFN_KINDS = FFN_KINDS
DECODE_ATTENTION = ("matmul", "sdpa")


class UnsupportedModelError(ValueError):
    """The checkpoint's model uses a feature the inference forward does not implement."""


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int  # real entries; logits beyond them are the zero-padded rows
    padded_vocab_size: int
    max_positions: int
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, cfg, padded_vocab_size: int) -> "ModelShape":
        m = cfg.model
        return cls(num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_attention_heads,
                   num_kv_heads=m.num_query_groups or m.num_attention_heads, vocab_size=m.vocab_size,
                   padded_vocab_size=padded_vocab_size, max_positions=m.max_position_embeddings,
                   rotary_base=float(m.rotary_base), norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings)


class InferenceLayer(nn.Module):
    """One decoder layer's weights: qkv rows regrouped as [Q; K; V]; the FFN of its kind (effdist.infer.ffn)."""

    def __init__(self, input_norm, qkv, proj, mlp_norm, ffn: InferenceFFN):
        super().__init__()
        self.register_buffer("input_norm", input_norm)
        self.register_buffer("qkv", qkv)
        self.register_buffer("proj", proj)
        self.register_buffer("mlp_norm", mlp_norm)
        self.ffn = ffn


def regroup_qkv(fused: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """megatron's per-group interleaved [q_g..., k_g, v_g]* rows -> [all Q; all K; all V] (query head order kept)."""
    qpg = num_heads // num_kv_heads
    blocks = fused.reshape(num_kv_heads, qpg + 2, head_dim, fused.shape[-1])
    q = blocks[:, :qpg].reshape(num_heads * head_dim, -1)
    k = blocks[:, qpg].reshape(num_kv_heads * head_dim, -1)
    v = blocks[:, qpg + 1].reshape(num_kv_heads * head_dim, -1)
    return torch.cat([q, k, v]).contiguous()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (megatron's unfused formula: ``x*cos + rotate_half(x)*sin``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def positions_of(valid: torch.Tensor) -> torch.Tensor:
    """RoPE positions of a left-padded batch: each sequence counts from 0 at its first real token."""
    return (valid.long().cumsum(dim=1) - 1).clamp_(min=0)


def padded_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean mask: causal, no padding keys; padding queries see themselves (no empty rows)."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril_()
    mask = causal[None, None] & valid[:, None, None, :]
    return mask | torch.eye(s, dtype=torch.bool, device=valid.device)


class InferenceModel(nn.Module):
    """The LLaMA decoder of an effdist checkpoint, for generation with any EPAS region."""

    def __init__(self, shape: ModelShape, embedding: torch.Tensor, layers: list[InferenceLayer],
                 final_norm: torch.Tensor, output: Optional[torch.Tensor], decode_attention: str = "matmul",
                 sparse_decode: bool = True):
        super().__init__()
        if len(layers) != shape.num_layers:
            raise ValueError(f"{len(layers)} layers given, the shape says {shape.num_layers}")
        self.shape = shape
        self.register_buffer("embedding", embedding)
        self.layers = nn.ModuleList(layers)
        self.register_buffer("final_norm", final_norm)
        if output is not None:
            self.register_buffer("output", output)
        else:
            self.output = None
        where = embedding.device
        inv_freq = 1.0 / (shape.rotary_base ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=where)
                                                / shape.head_dim))
        freqs = torch.outer(torch.arange(shape.max_positions, dtype=torch.float32, device=where), inv_freq)
        freqs = torch.cat([freqs, freqs], dim=-1)
        # Rounded to the model dtype when the module is cast, as megatron rounds cos/sin to the activations'.
        self.register_buffer("rope_cos", freqs.cos().to(embedding.dtype), persistent=False)
        self.register_buffer("rope_sin", freqs.sin().to(embedding.dtype), persistent=False)
        self.decode_attention = decode_attention
        # Decode steps run each sparse FFN through its gather-GEMV path (False: the dense math, as prefill).
        self.sparse_decode = sparse_decode

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], cfg, *, step: Optional[int] = None,
                        **kwargs) -> "InferenceModel":
        """From a TP=1 megatron GPTModel state dict (keys ``decoder.layers.{i}...``) and its effdist config.
        `step`: optimizer steps the weights were trained for (decides whether ELAS is past its dense
        warm-up; None: assumed past it)."""
        from effdist.config import resolve_count
        from effdist.model.ffn import ffn_kind_of_layer, ffn_width_of_layer

        def take(key: str) -> torch.Tensor:
            if key not in state_dict:
                raise UnsupportedModelError(f"the checkpoint has no tensor {key!r}; is it an effdist LLaMA model "
                                            f"(model.num_layers = {cfg.model.num_layers})?")
            return state_dict[key].detach()

        embedding = take("embedding.word_embeddings.weight").clone()
        # The padded vocabulary is whatever the weights have (it depends on the TP size they were made for).
        shape = ModelShape.from_config(cfg, padded_vocab_size=embedding.shape[0])
        nh, ng, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        f = cfg.ffn
        # ElasMLP is dense ReLU² while the trainer's step (0-based) is below the warm-up; the last
        # step of a checkpoint saved after `step` steps was step - 1.
        elas_sparse = f.elas_warmup_steps == 0 or step is None or step - 1 >= f.elas_warmup_steps

        layers = []
        for i in range(shape.num_layers):
            kind = ffn_kind_of_layer(cfg, i)
            if kind not in SUPPORTED_FFN_KINDS:
                raise UnsupportedModelError(f"layer {i} has ffn.kind = {kind!r}: effdist.infer runs "
                                            f"{', '.join(SUPPORTED_FFN_KINDS)} FFNs only")
            p = f"decoder.layers.{i}."
            width = ffn_width_of_layer(cfg, i)
            ffn = ffn_from_weights(kind, lambda name, p=p: take(p + "mlp." + name),
                                   topk_k=resolve_count(f.topk_k, width), topk_activation=f.topk_activation,
                                   moc_k=resolve_count(f.moc_k, width), moc_structured=f.moc_structured,
                                   elas_sparse=elas_sparse)
            ffn.select_method = f.select_method  # the top-K search of its decode step
            qkv = take(p + "self_attention.linear_qkv.weight")
            if qkv.shape != ((nh + 2 * ng) * d, shape.hidden_size):
                raise UnsupportedModelError(f"{p}self_attention.linear_qkv.weight has shape {tuple(qkv.shape)}, "
                                            f"the config says {((nh + 2 * ng) * d, shape.hidden_size)}")
            layers.append(InferenceLayer(
                input_norm=take(p + "input_layernorm.weight").clone(),
                qkv=regroup_qkv(qkv, nh, ng, d),
                proj=take(p + "self_attention.linear_proj.weight").clone(),
                mlp_norm=take(p + "pre_mlp_layernorm.weight").clone(),
                ffn=ffn))
        output = None if shape.tie_embeddings else take("output_layer.weight").clone()
        return cls(shape, embedding, layers, take("decoder.final_layernorm.weight").clone(), output, **kwargs)

    @classmethod
    def random(cls, shape: ModelShape, ffn_hidden_size: int, *, seed: int = 0, std: float = 0.02,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, ffn_kind: str = "swiglu",
               ffn_options: Optional[dict] = None, **kwargs) -> "InferenceModel":
        """Random weights of a given shape (throughput benchmarks, tests); FFNs of `ffn_kind`, `ffn_hidden_size`
        wide, with `ffn_options` for effdist.infer.ffn.random_ffn (k, topk_activation, moc_structured, rank)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        h, d = shape.hidden_size, shape.head_dim

        def normal(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype)

        def ones() -> torch.Tensor:
            return torch.ones(h, device=device, dtype=dtype)

        layers = [InferenceLayer(ones(), normal((shape.num_heads + 2 * shape.num_kv_heads) * d, h),
                                 normal(h, shape.num_heads * d), ones(),
                                 random_ffn(ffn_kind, h, ffn_hidden_size, normal, **(ffn_options or {})))
                  for _ in range(shape.num_layers)]
        output = None if shape.tie_embeddings else normal(shape.padded_vocab_size, h)
        return cls(shape, normal(shape.padded_vocab_size, h), layers, ones(), output, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    # ------------------------------------------------------------------ pieces
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, weight, self.shape.norm_eps, use_triton=x.is_cuda and _HAVE_TRITON)

    def _mlp(self, layer: InferenceLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.ffn.dense(self._norm(x, layer.mlp_norm))

    def _mlp_decode(self, layer: InferenceLayer, x: torch.Tensor) -> torch.Tensor:
        h = self._norm(x, layer.mlp_norm)
        return layer.ffn.decode(h) if self.sparse_decode else layer.ffn.dense(h)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.embedding if self.output is None else self.output
        return F.linear(self._norm(x, self.final_norm), weight)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.shape
        q_end, k_end = s.num_heads * s.head_dim, (s.num_heads + s.num_kv_heads) * s.head_dim
        return qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]

    def _values_weight(self, layer: InferenceLayer) -> torch.Tensor:
        s = self.shape
        return layer.qkv[(s.num_heads + s.num_kv_heads) * s.head_dim:]

    def _check_plan(self, plan: SharingPlan) -> None:
        if plan.num_layers != self.shape.num_layers:
            raise ValueError(f"the sharing plan is for {plan.num_layers} layers, this model has "
                             f"{self.shape.num_layers}")

    # ------------------------------------------------------------------ whole sequences
    def forward(self, tokens: torch.Tensor, plan: SharingPlan, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [b, s, padded_vocab] of every position (no cache). `valid` [b, s] marks real tokens of a
        left-padded batch (None: no padding)."""
        return self._sequence(tokens, plan, valid, cache=None, last_only=False)

    def prefill(self, tokens: torch.Tensor, plan: SharingPlan, cache: KVCache,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the (left-padded) prompt and fill the cache's first s slots; returns the logits
        [b, padded_vocab] of the last position."""
        if cache.plan != plan:
            raise ValueError("this cache was allocated for another sharing plan (sharing layers store no K)")
        if valid is None:
            valid = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        cache.reset(valid)
        return self._sequence(tokens, plan, valid, cache=cache, last_only=True)

    def _sequence(self, tokens, plan, valid, cache, last_only):
        self._check_plan(plan)
        s = self.shape
        b, n = tokens.shape
        if n > s.max_positions:
            raise ValueError(f"{n} tokens exceed the model's max_position_embeddings = {s.max_positions}")
        padded = valid is not None and not bool(valid.all())
        positions = positions_of(valid) if valid is not None else torch.arange(n, device=tokens.device).expand(b, n)
        cos = self.rope_cos[positions].unsqueeze(1)  # [b, 1, n, d]
        sin = self.rope_sin[positions].unsqueeze(1)
        mask = padded_attention_mask(valid) if padded else None
        gqa = s.num_kv_heads != s.num_heads
        x = F.embedding(tokens, self.embedding)
        q = k = None
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            if plan.shares(i):
                v = F.linear(h, self._values_weight(layer))
            else:
                q, k, v = self._split_qkv(F.linear(h, layer.qkv))
                q = rope(q.view(b, n, s.num_heads, s.head_dim).transpose(1, 2), cos, sin)
                k = rope(k.view(b, n, s.num_kv_heads, s.head_dim).transpose(1, 2), cos, sin)
            v = v.view(b, n, s.num_kv_heads, s.head_dim).transpose(1, 2)
            if cache is not None:
                if not plan.shares(i):
                    cache.keys[i][:, :, :n].copy_(k)
                cache.values[i][:, :, :n].copy_(v)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
            x = x + F.linear(a.transpose(1, 2).reshape(b, n, s.num_heads * s.head_dim), layer.proj)
            x = x + self._mlp(layer, x)
        if last_only:
            x = x[:, -1]
        return self._logits(x)

    # ------------------------------------------------------------------ one decode step
    def decode_step(self, cache: KVCache, plan: SharingPlan, attend_len: Optional[int] = None,
                    reuse_attention: bool = True) -> torch.Tensor:
        """Logits [b, padded_vocab] for the tokens in ``cache.tokens`` at ``cache.positions``, written to
        cache slot ``cache.slot``; attends over the first `attend_len` slots (default: exactly those
        filled, this one included). Does not advance the cache (``cache.advance()`` does).

        ``reuse_attention=False`` makes every sharing layer recompute its attention with SDPA from
        its anchor's Q and cached K (what training computes), instead of reusing the probabilities.
        Only fixed tensors of the cache are read and written: capturable as a CUDA graph for a
        fixed `attend_len`.
        """
        s = self.shape
        b = cache.batch
        t = cache.length + 1 if attend_len is None else attend_len
        if not 0 < t <= cache.max_len:
            raise ValueError(f"attend_len = {t} outside the cache's 1..{cache.max_len} slots")
        nh, ng, d, qpg = s.num_heads, s.num_kv_heads, s.head_dim, s.heads_per_group
        scale = 1.0 / math.sqrt(d)
        slot = cache.slot
        cos = self.rope_cos.index_select(0, cache.positions).unsqueeze(1)  # [b, 1, d]
        sin = self.rope_sin.index_select(0, cache.positions).unsqueeze(1)
        cache.bias.index_fill_(3, slot, 0.0)
        bias = cache.bias[..., :t]  # [b, 1, 1, t]
        x = F.embedding(cache.tokens, self.embedding)  # [b, h]
        q = keys = probs = None
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            values = cache.values[i]
            if plan.shares(i):
                v = F.linear(h, self._values_weight(layer))
                values.index_copy_(2, slot, v.view(b, ng, 1, d))
                if reuse_attention:
                    a = torch.matmul(probs, values[:, :, :t])  # [b, ng, qpg, d]
                else:
                    a = F.scaled_dot_product_attention(q.unsqueeze(2), keys[:, :, :t], values[:, :, :t],
                                                       attn_mask=bias, enable_gqa=ng != nh)
            else:
                qkv = F.linear(h, layer.qkv)
                qk = rope(qkv[:, :(nh + ng) * d].view(b, nh + ng, d), cos, sin)
                q = qk[:, :nh]
                keys = cache.keys[i]
                keys.index_copy_(2, slot, qk[:, nh:].unsqueeze(2))
                values.index_copy_(2, slot, qkv[:, (nh + ng) * d:].view(b, ng, 1, d))
                if self.decode_attention == "sdpa" and not (reuse_attention and plan.has_sharers(i)):
                    a = F.scaled_dot_product_attention(q.unsqueeze(2), keys[:, :, :t], values[:, :, :t],
                                                       attn_mask=bias, enable_gqa=ng != nh)
                else:
                    scores = torch.matmul((q * scale).view(b, ng, qpg, d), keys[:, :, :t].transpose(-1, -2))
                    probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(values.dtype)
                    a = torch.matmul(probs, values[:, :, :t])
            x = x + F.linear(a.reshape(b, nh * d), layer.proj)
            x = x + self._mlp_decode(layer, x)
        return self._logits(x)
