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
only the model, under the same ``model.`` keys as training checkpoints (loads at any TP size), with
its config beside the weights (``effdist_model.json``, and ``config.yaml`` to train with).

Every tensor is checked against the config before anything is converted or loaded: a checkpoint that
does not fit is one ConversionError listing each missing, unexpected or mis-shaped tensor
(effdist.model.checkpoint_fit). The command line is effdist.train.convert (`effdist convert`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from effdist.config import Config, config_from_dict, validate
from effdist.model.checkpoint_fit import (
    config_fix, dist_checkpoint_problems, mismatch_message, shape_changes, shape_problems)
from effdist.runtime.distributed import one_process_megatron  # noqa: F401 (re-exported)
from effdist.runtime.progress import Progress

TORCH_FORMAT = "effdist-model-v1"
# The config of a converted dist checkpoint directory (a training checkpoint has effdist.json instead).
CONVERTED_MARKER = "effdist_model.json"
TRAINING_MARKER = "effdist.json"  # effdist.train.checkpoint.MARKER, read here for its config only


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

def _padded_vocab(cfg: Config) -> int:
    from effdist.model.gpt import padded_vocab_size

    return padded_vocab_size(cfg)


def _dims(cfg: Config) -> tuple[int, int, int, int, int, int, int]:
    """(hidden, heads, query groups, head dim, heads per group, ffn hidden, vocab) of `cfg`'s model."""
    m = cfg.model
    h, nh = m.hidden_size, m.num_attention_heads
    ng = m.num_query_groups or nh
    return h, nh, ng, h // nh, nh // ng, m.ffn_hidden_size, m.vocab_size


# FFN kinds whose weights are SwiGLU's (gate and up in linear_fc1, the same widths): the same tensors in HF.
_SWIGLU_WEIGHTS = ("swiglu", "moc")


def _check_swiglu(cfg: Config, where: str, exporting: bool = False) -> None:
    if cfg.ffn.kind == "swiglu" or cfg.ffn.layers == []:
        return
    if not exporting:
        raise ConversionError(f"ffn.kind = {cfg.ffn.kind!r} in {where}: HF LLaMA layers are SwiGLU; convert with a "
                              "config whose ffn.kind is 'swiglu'")
    if cfg.ffn.kind in _SWIGLU_WEIGHTS:
        raise ConversionError(
            f"ffn.kind = {cfg.ffn.kind!r} in {where}: HF LLaMA layers are dense SwiGLU. This FFN's weights are "
            "SwiGLU's, so --config with the checkpoint's config.yaml and ffn.kind: swiglu exports them, and "
            f"transformers then computes every channel ({cfg.ffn.kind}'s channel selection is not exported)")
    raise ConversionError(
        f"ffn.kind = {cfg.ffn.kind!r} in {where}: HF LLaMA layers are SwiGLU, and this FFN's weights have other "
        "shapes, so the model has no transformers equivalent; generate from it with `effdist generate` "
        "(docs/inference.md)")


def hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF LlamaForCausalLM equivalent to `cfg`'s model, with its shape."""
    h, nh, ng, d, _, f, v = _dims(cfg)
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.model.num_layers):
        hp = f"model.layers.{i}."
        out.update({hp + "self_attn.q_proj.weight": (nh * d, h), hp + "self_attn.k_proj.weight": (ng * d, h),
                    hp + "self_attn.v_proj.weight": (ng * d, h), hp + "self_attn.o_proj.weight": (h, nh * d),
                    hp + "input_layernorm.weight": (h,), hp + "post_attention_layernorm.weight": (h,),
                    hp + "mlp.gate_proj.weight": (f, h), hp + "mlp.up_proj.weight": (f, h),
                    hp + "mlp.down_proj.weight": (h, f)})
    out["model.norm.weight"] = (h,)
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def effdist_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of effdist's GPTModel state dict (full model, TP=1) for `cfg`, with its shape."""
    h, nh, ng, d, _, f, _ = _dims(cfg)
    padded = _padded_vocab(cfg)
    out = {"embedding.word_embeddings.weight": (padded, h)}
    for i in range(cfg.model.num_layers):
        mp = f"decoder.layers.{i}."
        out.update({mp + "input_layernorm.weight": (h,),
                    mp + "self_attention.linear_qkv.weight": ((nh + 2 * ng) * d, h),
                    mp + "self_attention.linear_proj.weight": (h, nh * d), mp + "pre_mlp_layernorm.weight": (h,),
                    mp + "mlp.linear_fc1.weight": (2 * f, h), mp + "mlp.linear_fc2.weight": (h, f)})
    out["decoder.final_layernorm.weight"] = (h,)
    if not cfg.model.tie_embeddings:
        out["output_layer.weight"] = (padded, h)
    return out


def _vocab_hint(problems: list[str], sd: dict[str, torch.Tensor], embedding: str, rows: int, what: str) -> list[str]:
    """The problems, led by a vocabulary line when the embedding's row count is what differs."""
    t = sd.get(embedding)
    if t is not None and t.dim() == 2 and t.shape[0] != rows:
        return [f"vocabulary: {embedding} has {t.shape[0]} rows, {what} {rows}"] + problems
    return problems


def hf_to_effdist(hf_sd: dict[str, torch.Tensor], cfg: Config, progress: bool = True) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM state dict -> effdist GPTModel state dict (full model, TP=1). Raises
    ConversionError listing every tensor that does not fit `cfg` before converting any."""
    _check_swiglu(cfg, "the config")
    h, nh, ng, d, qpg, f, v = _dims(cfg)
    pad = _padded_vocab(cfg) - v
    found = {k: tuple(t.shape) for k, t in hf_sd.items() if not k.endswith("rotary_emb.inv_freq")
             and not (cfg.model.tie_embeddings and k == "lm_head.weight")}
    problems = shape_problems(hf_shapes(cfg), found, found_name="the HF checkpoint")
    if problems:
        problems = _vocab_hint(problems, hf_sd, "model.embed_tokens.weight", v, "config.json says vocab_size =")
        raise ConversionError(mismatch_message(
            f"the HF checkpoint does not fit its config.json ({len(problems)} problem(s)):", problems,
            "the weights and config.json must come from the same model: re-export it with save_pretrained, or "
            "correct config.json (vocab_size, hidden_size, intermediate_size, num_hidden_layers, heads)"))

    def pad_vocab(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t.clone()

    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": pad_vocab(hf_sd["model.embed_tokens.weight"])}
    with Progress("converting HF -> effdist", total=cfg.model.num_layers, unit="layers", enabled=progress) as bar:
        for i in range(cfg.model.num_layers):
            hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
            q = hf_sd[hp + "self_attn.q_proj.weight"].reshape(ng, qpg * d, h)
            k = hf_sd[hp + "self_attn.k_proj.weight"].reshape(ng, d, h)
            val = hf_sd[hp + "self_attn.v_proj.weight"].reshape(ng, d, h)
            out[mp + "input_layernorm.weight"] = hf_sd[hp + "input_layernorm.weight"].clone()
            out[mp + "self_attention.linear_qkv.weight"] = torch.cat([q, k, val], dim=1).reshape(-1, h)
            out[mp + "self_attention.linear_proj.weight"] = hf_sd[hp + "self_attn.o_proj.weight"].clone()
            out[mp + "pre_mlp_layernorm.weight"] = hf_sd[hp + "post_attention_layernorm.weight"].clone()
            out[mp + "mlp.linear_fc1.weight"] = torch.cat([hf_sd[hp + "mlp.gate_proj.weight"],
                                                           hf_sd[hp + "mlp.up_proj.weight"]])
            out[mp + "mlp.linear_fc2.weight"] = hf_sd[hp + "mlp.down_proj.weight"].clone()
            bar.update()
    out["decoder.final_layernorm.weight"] = hf_sd["model.norm.weight"].clone()
    if not cfg.model.tie_embeddings:
        out["output_layer.weight"] = pad_vocab(hf_sd["lm_head.weight"])
    return out


def effdist_to_hf(sd: dict[str, torch.Tensor], cfg: Config, progress: bool = True) -> dict[str, torch.Tensor]:
    """effdist GPTModel state dict (full model, TP=1) -> HF LlamaForCausalLM state dict. Raises
    ConversionError listing every tensor that does not fit `cfg` before converting any."""
    _check_swiglu(cfg, "the checkpoint's config", exporting=True)
    h, nh, ng, d, qpg, f, v = _dims(cfg)
    found = {k: tuple(t.shape) for k, t in sd.items() if torch.is_tensor(t) and not k.endswith("._extra_state")}
    # The vocabulary padding depends on the TP size the model was built for (a TP=2 checkpoint loaded at
    # TP=1 keeps either); any padding works as long as every real token has its row.
    vocab_rows = frozenset(k for k in ("embedding.word_embeddings.weight", "output_layer.weight")
                           if k in found and found[k][0] >= v)
    problems = shape_problems(effdist_shapes(cfg), found, found_name="the effdist checkpoint", vocab_rows=vocab_rows)
    if problems:
        problems = _vocab_hint(problems, sd, "embedding.word_embeddings.weight", _padded_vocab(cfg),
                               f"the config has vocab_size = {v}, padded to")
        raise ConversionError(mismatch_message(
            f"the effdist checkpoint does not fit the config ({len(problems)} problem(s)):", problems,
            "convert with the config the checkpoint was written with (leave out --config: the checkpoint "
            "carries its own)"))

    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:v].clone()}
    with Progress("converting effdist -> HF", total=cfg.model.num_layers, unit="layers", enabled=progress) as bar:
        for i in range(cfg.model.num_layers):
            hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
            qkv = sd[mp + "self_attention.linear_qkv.weight"].reshape(ng, (qpg + 2) * d, h)
            q, k, val = torch.split(qkv, [qpg * d, d, d], dim=1)
            out[hp + "self_attn.q_proj.weight"] = q.reshape(nh * d, h).clone()
            out[hp + "self_attn.k_proj.weight"] = k.reshape(ng * d, h).clone()
            out[hp + "self_attn.v_proj.weight"] = val.reshape(ng * d, h).clone()
            out[hp + "self_attn.o_proj.weight"] = sd[mp + "self_attention.linear_proj.weight"].clone()
            out[hp + "input_layernorm.weight"] = sd[mp + "input_layernorm.weight"].clone()
            out[hp + "post_attention_layernorm.weight"] = sd[mp + "pre_mlp_layernorm.weight"].clone()
            gate, up = sd[mp + "mlp.linear_fc1.weight"].chunk(2)
            out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = gate.clone(), up.clone()
            out[hp + "mlp.down_proj.weight"] = sd[mp + "mlp.linear_fc2.weight"].clone()
            bar.update()
    out["model.norm.weight"] = sd["decoder.final_layernorm.weight"].clone()
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"][:v].clone()
    return out


# ---------------------------------------------------------------------- files

def load_hf_checkpoint(hf_dir: str | Path, progress: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of a HF model directory."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: give a Hugging Face model directory")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise ConversionError(f"{config_path} holds {type(hf_config).__name__}, expected a JSON object")
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file as read
    else:
        files = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not files:
            raise ConversionError(f"{hf_dir} has neither *.safetensors nor pytorch_model*.bin weights")

        def read(f):
            return torch.load(f, map_location="cpu", weights_only=True)
    sd: dict[str, torch.Tensor] = {}
    with Progress(f"reading {hf_dir.name}", total=sum(f.stat().st_size for f in files), unit="B",
                  enabled=progress) as bar:
        for f in files:
            sd.update(read(str(f)))
            bar.update(f.stat().st_size)
    return hf_config, sd


def save_hf_checkpoint(out_dir: str | Path, hf_sd: dict[str, torch.Tensor], cfg: Config) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(hf_sd.values())).dtype
    (out_dir / "config.json").write_text(json.dumps(hf_config_from(cfg, dtype), indent=2))
    weights = out_dir / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(weights), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; readable like config.json beside it
    return out_dir


def save_torch(path: str | Path, sd: dict[str, torch.Tensor], cfg: Config) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": TORCH_FORMAT, "config": cfg.to_dict(), "model": sd}, path)
    return path


def load_torch(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except OSError:
        raise  # unreadable (permissions, a directory): the command names the path
    except Exception as e:  # not a torch file at all (a metrics.jsonl, a config.yaml): pickle/zip errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise ConversionError(f"{path} is not an effdist model file (format {TORCH_FORMAT}): torch cannot read it "
                              f"({reason}); give a run directory, a checkpoint directory, or a file written by "
                              "`effdist convert hf-to-effdist --format torch`") from None
    if not isinstance(blob, dict) or blob.get("format") != TORCH_FORMAT:
        raise ConversionError(f"{path} is not an effdist model file (format {TORCH_FORMAT})")
    return config_from_dict(blob["config"]), blob["model"]


def _cpu_model(cfg: Config, dtype: torch.dtype):
    from effdist.model.gpt import build_gpt

    single = config_from_dict(cfg.to_dict())
    single.parallel.tp, single.parallel.pp, single.parallel.sequence_parallel = 1, 1, False
    return build_gpt(single.model, single.parallel, single.train, single.ffn, single.epas, dtype, torch.device("cpu"))


def save_dist_checkpoint(out_dir: str | Path, sd: dict[str, torch.Tensor], cfg: Config) -> Path:
    """Write the model as a megatron dist_checkpointing directory (keys ``model.*``, as training saves),
    with its config: effdist_model.json (read back by effdist) and config.yaml (`effdist train --config`)."""
    from megatron.core import dist_checkpointing

    from effdist.runtime.megatron_patches import write_results_in_process

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(sd.values())).dtype
    with one_process_megatron():
        model = _cpu_model(cfg, dtype)
        model.load_state_dict(sd, strict=False)
        with write_results_in_process():
            dist_checkpointing.save({"model": model.sharded_state_dict(prefix="model.")}, str(out_dir))
    (out_dir / CONVERTED_MARKER).write_text(json.dumps({"format": TORCH_FORMAT, "config": cfg.to_dict()}))
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    return out_dir


def saved_config(path: str | Path) -> dict[str, Any] | None:
    """The config (as a dict) a checkpoint directory was written with: a training checkpoint's
    effdist.json or a converted model's effdist_model.json; None when it has neither."""
    for name in (CONVERTED_MARKER, TRAINING_MARKER):
        meta = Path(path) / name
        if meta.is_file():
            try:
                return json.loads(meta.read_text()).get("config")
            except (OSError, json.JSONDecodeError):
                return None
    return None


def load_dist_checkpoint(path: str | Path, cfg: Config, dtype: torch.dtype = torch.float32,
                         progress: bool = True) -> dict[str, torch.Tensor]:
    """The model (TP=1 state dict) from a dist_checkpointing directory: a training checkpoint (any TP/PP
    layout, one model chunk per stage or several), or one written by save_dist_checkpoint. Raises
    ConversionError listing every tensor that does not fit `cfg` before reading any weight."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    with one_process_megatron(), Progress(f"loading {path.name}", enabled=progress) as bar:
        bar.stage("building the model")
        model = _cpu_model(cfg, dtype)
        sharded = model.sharded_state_dict(prefix="model.")
        bar.stage("checking tensors")
        saved = saved_config(path)
        problems = dist_checkpoint_problems(path, sharded, saved, cfg.to_dict())
        if problems:
            changes = shape_changes(saved, cfg.to_dict()) if saved else []
            raise ConversionError(mismatch_message(
                f"checkpoint {path} does not fit the config ({len(problems)} problem(s)):", problems,
                "leave out --config (the checkpoint carries its own)" if saved else
                "pass --config with the config the checkpoint was written with"
                + (f" ({config_fix(changes)})" if changes else "")))
        bar.stage("reading weights")
        loaded = dist_checkpointing.load({"model": sharded}, str(path))
        own = {k[len("model."):]: v for k, v in loaded["model"].items()}
        model.load_state_dict(own, strict=True)
        bar.stage("done")
        return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def checkpoint_engine(path: str | Path) -> str | None:
    """The engine that wrote training checkpoint directory `path` (its effdist.json; "megatron" when the marker
    names none), or None where `path` has no readable marker (a file, a converted model, a damaged marker)."""
    marker = Path(path) / TRAINING_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text()).get("engine", "megatron")
    except (OSError, ValueError, AttributeError):
        return None


def refuse_other_engines(path: str | Path) -> None:
    """A training checkpoint of the DeepSpeed engine holds DeepSpeed's own shards, which neither conversion nor
    generation reads: ConversionError saying so (instead of megatron's "not a distributed checkpoint")."""
    engine = checkpoint_engine(path)
    if engine not in (None, "megatron"):
        raise ConversionError(
            f"{path} is a checkpoint of the {engine} engine ({engine}'s own shards); effdist convert and effdist "
            "generate read the default engine's checkpoints and converted models only, and effdist has no "
            "converter from DeepSpeed's format yet (docs/deepspeed.md, \"Between engines\")")


def load_effdist_model(path: str | Path, cfg: Config | None = None,
                       progress: bool = True) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, TP=1 state dict) from a torch model file, or a dist checkpoint directory (needs `cfg`
    unless it was written by this module or holds the trainer's effdist.json with the config)."""
    path = Path(path)
    if path.is_file():
        saved_cfg, sd = load_torch(path)
        return cfg or saved_cfg, sd
    refuse_other_engines(path)
    if cfg is None:
        saved = saved_config(path)
        if saved is None:
            raise ConversionError(f"{path}: cannot tell the model's config ({CONVERTED_MARKER} or "
                                  f"{TRAINING_MARKER} missing); pass --config")
        cfg = config_from_dict(saved)
    return cfg, load_dist_checkpoint(path, cfg, progress=progress)
