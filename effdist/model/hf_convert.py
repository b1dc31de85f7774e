"""Convert between Hugging Face LLaMA checkpoints (e.g. TinyLlama) and effdist models, both ways.

Layouts (effdist side = megatron-core GPTModel state dict, full model, TP=1):

* Q/K/V: HF keeps ``q_proj`` [heads*d, h], ``k_proj`` / ``v_proj`` [kv_heads*d, h]; megatron fuses
  them into ``linear_qkv`` interleaved per query group: [q heads of group 0, k0, v0, q heads of
  group 1, k1, v1, ...].
* RoPE: both use the rotate-half layout (first half / second half of each head), with the same
  inverse frequencies, so Q/K rows need no permutation (the permutation HF's own converter applies
  is from Meta's interleaved checkpoints, not needed here).
* SwiGLU: megatron's ``linear_fc1`` is [gate; up] (silu on the first half).
* Vocabulary: effdist pads the embedding and LM head to a multiple of
  ``make_vocab_size_divisible_by * tp`` with zero rows; converting back drops them.

Files: HF directories hold ``config.json`` and ``*.safetensors`` (sharded with an index, or one
file; ``pytorch_model*.bin`` is read too). effdist outputs are either a torch file
(``{"format", "config", "model"}``, the default) or a megatron dist_checkpointing directory holding
only the model, under the same ``model.`` keys as training checkpoints (loads at any TP size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from effdist.runtime.distributed import one_process_megatron  # noqa: F401 (re-exported)
from effdist.config import Config, ConfigError, config_from_dict, validate

TORCH_FORMAT = "effdist-model-v1"


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message says which field or tensor and why."""


# ---------------------------------------------------------------------- configs

def config_from_hf(hf: dict[str, Any], base: Config | None = None) -> Config:
    """An effdist Config whose model section is the HF LLaMA config `hf` (other sections from `base`)."""
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ConversionError(f"config.json model_type = {model_type!r}: only 'llama' checkpoints are supported")
    # transformers >= 5 keeps RoPE settings in rope_parameters; older configs in rope_theta/rope_scaling.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "rope_scaling type": (scaling.get("rope_type", scaling.get("type", "default")), "default"),
        "rope_parameters.rope_type": (rope.get("rope_type", "default"), "default"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "pretraining_tp": (hf.get("pretraining_tp", 1), 1),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConversionError(f"config.json {key} = {value!r}: effdist's LLaMA supports only {wanted!r}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ConversionError(f"config.json head_dim = {head_dim}: effdist needs hidden_size / num_attention_heads "
                              f"= {hf['hidden_size'] // heads}")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    cfg = config_from_dict(base.to_dict()) if base is not None else Config()
    m = cfg.model
    m.name = hf.get("_name_or_path") or m.name
    m.num_layers = hf["num_hidden_layers"]
    m.hidden_size = hf["hidden_size"]
    m.num_attention_heads = heads
    m.num_query_groups = hf.get("num_key_value_heads") or heads
    m.ffn_hidden_size = hf["intermediate_size"]
    m.vocab_size = hf["vocab_size"]
    m.max_position_embeddings = hf["max_position_embeddings"]
    m.rotary_base = float(rope_theta)
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.init_std = float(hf.get("initializer_range", m.init_std))
    if cfg.data.seq_length > m.max_position_embeddings:
        cfg.data.seq_length = m.max_position_embeddings
    if not float(m.rotary_base).is_integer():
        raise ConversionError(f"config.json rope_theta = {rope_theta}: megatron's RoPE takes an integer base")
    validate(cfg)
    return cfg


def hf_config_from(cfg: Config, torch_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the HF LlamaForCausalLM equivalent to `cfg`'s model."""
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rotary_base},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "torch_dtype": str(torch_dtype).replace("torch.", ""),
    }


# ---------------------------------------------------------------------- state dicts

def _shape_check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ConversionError(f"tensor {name} has shape {tuple(t.shape)}, the config says {shape}")
    return t


def _padded_vocab(cfg: Config) -> int:
    from effdist.model.gpt import padded_vocab_size

    return padded_vocab_size(cfg)


def hf_to_effdist(hf_sd: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM state dict -> effdist GPTModel state dict (full model, TP=1)."""
    m = cfg.model
    h, nh = m.hidden_size, m.num_attention_heads
    ng, d = m.num_query_groups or nh, m.hidden_size // nh
    qpg, f, v = nh // ng, m.ffn_hidden_size, m.vocab_size
    pad = _padded_vocab(cfg) - v
    known = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in hf_sd:
            raise ConversionError(f"the HF checkpoint has no tensor {name}")
        known.add(name)
        return _shape_check(name, hf_sd[name], shape)

    def pad_vocab(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t.clone()

    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": pad_vocab(take("model.embed_tokens.weight", (v, h)))}
    for i in range(m.num_layers):
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = take(hp + "self_attn.q_proj.weight", (nh * d, h)).reshape(ng, qpg * d, h)
        k = take(hp + "self_attn.k_proj.weight", (ng * d, h)).reshape(ng, d, h)
        val = take(hp + "self_attn.v_proj.weight", (ng * d, h)).reshape(ng, d, h)
        out[mp + "input_layernorm.weight"] = take(hp + "input_layernorm.weight", (h,)).clone()
        out[mp + "self_attention.linear_qkv.weight"] = torch.cat([q, k, val], dim=1).reshape(-1, h)
        out[mp + "self_attention.linear_proj.weight"] = take(hp + "self_attn.o_proj.weight", (h, nh * d)).clone()
        out[mp + "pre_mlp_layernorm.weight"] = take(hp + "post_attention_layernorm.weight", (h,)).clone()
        out[mp + "mlp.linear_fc1.weight"] = torch.cat([take(hp + "mlp.gate_proj.weight", (f, h)),
                                                       take(hp + "mlp.up_proj.weight", (f, h))])
        out[mp + "mlp.linear_fc2.weight"] = take(hp + "mlp.down_proj.weight", (h, f)).clone()
    out["decoder.final_layernorm.weight"] = take("model.norm.weight", (h,)).clone()
    if not m.tie_embeddings:
        out["output_layer.weight"] = pad_vocab(take("lm_head.weight", (v, h)))
    leftover = [k for k in hf_sd if k not in known and not k.endswith("rotary_emb.inv_freq")
                and not (m.tie_embeddings and k == "lm_head.weight")]
    if leftover:
        raise ConversionError(f"the HF checkpoint has tensors this LLaMA layout does not use: {leftover[:5]}"
                              f"{' ...' if len(leftover) > 5 else ''}")
    return out


def effdist_to_hf(sd: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """effdist GPTModel state dict (full model, TP=1) -> HF LlamaForCausalLM state dict."""
    m = cfg.model
    h, nh = m.hidden_size, m.num_attention_heads
    ng, d = m.num_query_groups or nh, m.hidden_size // nh
    qpg, f, v = nh // ng, m.ffn_hidden_size, m.vocab_size
    padded = _padded_vocab(cfg)

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in sd:
            raise ConversionError(f"the effdist state dict has no tensor {name}")
        return _shape_check(name, sd[name], shape)

    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight", (padded, h))[:v].clone()}
    for i in range(m.num_layers):
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = take(mp + "self_attention.linear_qkv.weight", ((nh + 2 * ng) * d, h)).reshape(ng, (qpg + 2) * d, h)
        q, k, val = torch.split(qkv, [qpg * d, d, d], dim=1)
        out[hp + "self_attn.q_proj.weight"] = q.reshape(nh * d, h).clone()
        out[hp + "self_attn.k_proj.weight"] = k.reshape(ng * d, h).clone()
        out[hp + "self_attn.v_proj.weight"] = val.reshape(ng * d, h).clone()
        out[hp + "self_attn.o_proj.weight"] = take(mp + "self_attention.linear_proj.weight", (h, nh * d)).clone()
        out[hp + "input_layernorm.weight"] = take(mp + "input_layernorm.weight", (h,)).clone()
        out[hp + "post_attention_layernorm.weight"] = take(mp + "pre_mlp_layernorm.weight", (h,)).clone()
        gate, up = take(mp + "mlp.linear_fc1.weight", (2 * f, h)).chunk(2)
        out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = gate.clone(), up.clone()
        out[hp + "mlp.down_proj.weight"] = take(mp + "mlp.linear_fc2.weight", (h, f)).clone()
    out["model.norm.weight"] = take("decoder.final_layernorm.weight", (h,)).clone()
    if not m.tie_embeddings:
        out["lm_head.weight"] = take("output_layer.weight", (padded, h))[:v].clone()
    return out


# ---------------------------------------------------------------------- files

def load_hf_checkpoint(hf_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of a HF model directory."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: give a Hugging Face model directory")
    hf_config = json.loads(config_path.read_text())
    files = sorted(hf_dir.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            sd.update(load_file(str(f)))
    else:
        bins = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise ConversionError(f"{hf_dir} has neither *.safetensors nor pytorch_model*.bin weights")
        for f in bins:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return hf_config, sd


def save_hf_checkpoint(out_dir: str | Path, hf_sd: dict[str, torch.Tensor], cfg: Config) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(hf_sd.values())).dtype
    (out_dir / "config.json").write_text(json.dumps(hf_config_from(cfg, dtype), indent=2))
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir


def save_torch(path: str | Path, sd: dict[str, torch.Tensor], cfg: Config) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": TORCH_FORMAT, "config": cfg.to_dict(), "model": sd}, path)
    return path


def load_torch(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != TORCH_FORMAT:
        raise ConversionError(f"{path} is not an effdist model file (format {TORCH_FORMAT})")
    return config_from_dict(blob["config"]), blob["model"]


def _cpu_model(cfg: Config, dtype: torch.dtype):
    from effdist.model.gpt import build_gpt

    single = config_from_dict(cfg.to_dict())
    single.parallel.tp, single.parallel.pp, single.parallel.sequence_parallel = 1, 1, False
    return build_gpt(single, dtype, torch.device("cpu"))


def save_dist_checkpoint(out_dir: str | Path, sd: dict[str, torch.Tensor], cfg: Config) -> Path:
    """Write the model as a megatron dist_checkpointing directory (keys ``model.*``, as training saves)."""
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(sd.values())).dtype
    with one_process_megatron():
        model = _cpu_model(cfg, dtype)
        model.load_state_dict(sd, strict=False)
        dist_checkpointing.save({"model": model.sharded_state_dict(prefix="model.")}, str(out_dir))
    (out_dir / "effdist_model.json").write_text(json.dumps({"format": TORCH_FORMAT, "config": cfg.to_dict()}))
    return out_dir


def load_dist_checkpoint(path: str | Path, cfg: Config, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model (TP=1 state dict) from a dist_checkpointing directory: a training checkpoint of a
    single-chunk model, or one written by save_dist_checkpoint."""
    from megatron.core import dist_checkpointing

    with one_process_megatron():
        model = _cpu_model(cfg, dtype)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict(prefix="model.")}, str(path))
        own = {k[len("model."):]: v for k, v in loaded["model"].items()}
        model.load_state_dict(own, strict=True)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def load_effdist_model(path: str | Path, cfg: Config | None = None) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, TP=1 state dict) from a torch model file, or a dist checkpoint directory (needs `cfg`
    unless it was written by this module or holds the trainer's effdist.json with the config)."""
    path = Path(path)
    if path.is_file():
        saved_cfg, sd = load_torch(path)
        return cfg or saved_cfg, sd
    if cfg is None:
        for meta in ("effdist_model.json", "effdist.json"):
            if (path / meta).is_file():
                cfg = config_from_dict(json.loads((path / meta).read_text())["config"])
                break
        else:
            raise ConversionError(f"{path}: cannot tell the model's config; pass --config")
    return cfg, load_dist_checkpoint(path, cfg)


# ---------------------------------------------------------------------- command line

def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effdist convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("hf-to-effdist", help="HF LLaMA directory -> effdist model")
    to.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    to.add_argument("--out", required=True, help="output file (--format torch) or directory (--format dist)")
    to.add_argument("--format", choices=("torch", "dist"), default="torch",
                    help="torch: one file with config + state dict (default); dist: megatron dist_checkpointing "
                         "directory with the model under the training checkpoints' keys")
    to.add_argument("--config", default=None, help="effdist YAML whose non-model sections to keep (epas, train, ...)")
    to.add_argument("--config-out", default=None, help="write the resulting effdist config (YAML) here")
    to.add_argument("--dtype", choices=("keep", "fp32", "bf16"), default="keep")
    back = sub.add_parser("effdist-to-hf", help="effdist model -> HF LLaMA directory")
    back.add_argument("--checkpoint", required=True, help="torch model file, or a dist checkpoint directory")
    back.add_argument("--config", default=None, help="effdist YAML of the model (needed for some dist checkpoints)")
    back.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    back.add_argument("--dtype", choices=("keep", "fp32", "bf16"), default="keep")
    return p


def _cast(sd: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "keep":
        return sd
    target = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return {k: v.to(target) for k, v in sd.items()}


def main(argv: list[str] | None = None) -> int:
    from effdist.config import load_config

    args = build_arg_parser().parse_args(argv)
    try:
        if args.direction == "hf-to-effdist":
            base = load_config(args.config) if args.config else None
            hf_config, hf_sd = load_hf_checkpoint(args.hf_dir)
            cfg = config_from_hf(hf_config, base)
            sd = _cast(hf_to_effdist(hf_sd, cfg), args.dtype)
            out = (save_torch if args.format == "torch" else save_dist_checkpoint)(args.out, sd, cfg)
            if args.config_out:
                Path(args.config_out).write_text(cfg.to_yaml())
            print(f"wrote {out} ({args.format}): {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}")
        else:
            cfg = load_config(args.config) if args.config else None
            cfg, sd = load_effdist_model(args.checkpoint, cfg)
            out = save_hf_checkpoint(args.out, _cast(effdist_to_hf(sd, cfg), args.dtype), cfg)
            print(f"wrote {out}")
    except (ConversionError, ConfigError) as e:
        print(f"effdist convert: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
