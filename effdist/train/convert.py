"""`effdist convert`: Hugging Face LLaMA checkpoints <-> effdist, both ways (continual pretraining).

    effdist convert hf-to-effdist --hf-dir TinyLlama-1.1B --out tinyllama --format dist   # alias: from-hf
    effdist train --config tinyllama/config.yaml --set checkpoint.init_from=tinyllama ...
    effdist convert effdist-to-hf --checkpoint runs/tinyllama --out TinyLlama-continued    # alias: to-hf

`--checkpoint` takes a run directory (its newest complete checkpoint), its checkpoints/ directory, one
checkpoints/iter_NNNNNNN directory, or what hf-to-effdist wrote. The tensor layouts are in
effdist.model.hf_convert; here the paths are resolved and every error becomes one named message
(exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effdist.config import Config, ConfigError, load_config
from effdist.model import hf_convert
from effdist.model.checkpoint_fit import SHAPE_KEYS
from effdist.model.hf_convert import ConversionError
from effdist.runtime.cli_parser import ArgumentParser
from effdist.train import checkpoint as ckpt

TO_EFFDIST = ("hf-to-effdist", "from-hf")
TO_HF = ("effdist-to-hf", "to-hf")


def build_arg_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="effdist convert",
                       description="Convert between Hugging Face LLaMA checkpoints and effdist models.")
    sub = p.add_subparsers(dest="direction", required=True)
    to = sub.add_parser(TO_EFFDIST[0], aliases=list(TO_EFFDIST[1:]), help="HF LLaMA directory -> effdist model")
    to.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    to.add_argument("--out", required=True, help="output file (--format torch) or directory (--format dist)")
    to.add_argument("--format", choices=("torch", "dist"), default="torch",
                    help="torch: one file with config + state dict (default); dist: megatron dist_checkpointing "
                         "directory with the model under the training checkpoints' keys and a config.yaml to train "
                         "with (checkpoint.init_from)")
    to.add_argument("--config", default=None,
                    help="effdist YAML whose non-model sections to keep (data, train, epas, ...); the model section "
                         "always comes from the HF config.json")
    to.add_argument("--config-out", default=None, help="also write the resulting effdist config (YAML) here")
    to.add_argument("--dtype", choices=("keep", "fp32", "bf16"), default="keep")
    to.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at --out / --config-out")
    back = sub.add_parser(TO_HF[0], aliases=list(TO_HF[1:]), help="effdist model -> HF LLaMA directory")
    back.add_argument("--checkpoint", required=True,
                      help="a run directory (its newest complete checkpoint), its checkpoints/ directory, one "
                           "iter_NNNNNNN checkpoint, or a model written by hf-to-effdist (file or directory)")
    back.add_argument("--config", default=None,
                      help="effdist YAML of the model (only for a dist checkpoint that does not carry its config)")
    back.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    back.add_argument("--dtype", choices=("keep", "fp32", "bf16"), default="keep")
    back.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    return p


# A directory holding any of these is a training run's: a conversion never writes into one.
_RUN_ENTRIES = ("metrics.jsonl", "checkpoints", "effdist.lock")
# Weight files of a Hugging Face directory that model.safetensors would silently sit beside.
_HF_WEIGHTS = ("*.safetensors", "*.bin", "*.index.json", "*.pth")


def output_problem(out: Path, kind: str, overwrite: bool) -> str | None:
    """Why writing a conversion to `out` (kind "file" or "dir") would replace or mix with what is there, or None.
    Nothing a user made is replaced unless --overwrite says so; a run directory or other weights never are."""
    if not out.exists():
        return None
    if kind == "file":
        if out.is_dir():
            return f"--out {out} is a directory; --format torch writes one file: give a file name"
        return None if overwrite else f"--out {out} exists: give a new name, or --overwrite to replace it"
    if not out.is_dir():
        return f"--out {out} is a file; this conversion writes a directory: give a directory name"
    run = [name for name in _RUN_ENTRIES if (out / name).exists()]
    if run:
        return (f"--out {out} is a training run directory (it holds {', '.join(run)}): writing the model there "
                "would replace its config.yaml; give another --out")
    held = sorted(p.name for p in out.iterdir())
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        return f"--out {out} is not empty ({shown}): give a new directory, or --overwrite to replace the model there"
    return None


def _hf_weights_beside(out: Path) -> list[str]:
    """Weight files in an HF --out directory that the export would not replace (model.safetensors it does)."""
    if not out.is_dir():
        return []
    return sorted({p.name for pattern in _HF_WEIGHTS for p in out.glob(pattern)} - {"model.safetensors"})


def _check_outputs(args: argparse.Namespace) -> None:
    if args.direction in TO_EFFDIST:
        problem = output_problem(Path(args.out), "file" if args.format == "torch" else "dir", args.overwrite)
        out, config_out = Path(args.out).resolve(), Path(args.config_out).resolve() if args.config_out else None
        if problem is None and config_out is not None and (config_out == out or out in config_out.parents):
            problem = (f"--config-out {args.config_out} is --out or inside it: the config would replace what the "
                       "conversion writes there; give a file elsewhere"
                       + (f" (the dist --out holds its config already: {Path(args.out) / 'config.yaml'})"
                          if args.format == "dist" else ""))
        if problem is None and args.config_out:
            problem = output_problem(Path(args.config_out), "file", args.overwrite)
            problem = problem and problem.replace("--out", "--config-out")
    else:
        problem = output_problem(Path(args.out), "dir", args.overwrite)
        stale = _hf_weights_beside(Path(args.out))
        if problem is None and stale:
            problem = (f"--out {args.out} holds other weight files ({', '.join(stale)}) that would sit beside the new "
                       "model.safetensors and be loaded with it: give a new directory, or move them away")
    if problem:
        raise ConversionError(problem)


def _cast(sd: dict, dtype: str) -> dict:
    if dtype == "keep":
        return sd
    import torch

    target = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return {k: v.to(target) for k, v in sd.items()}


def replaced_model_keys(base: Config, cfg: Config) -> list[str]:
    """`key: base value -> HF value` for every shape key the HF config.json changed in --config's model."""
    out = []
    for key in SHAPE_KEYS:
        section, name = key.split(".")
        if section != "model":
            continue
        before, after = getattr(base.model, name), getattr(cfg.model, name)
        if before != after:
            out.append(f"{key}: {before} -> {after}")
    return out


def hf_to_effdist(args: argparse.Namespace) -> None:
    base = load_config(args.config) if args.config else None
    hf_config, hf_sd = hf_convert.load_hf_checkpoint(args.hf_dir)
    cfg = hf_convert.config_from_hf(hf_config, base)
    sd = _cast(hf_convert.hf_to_effdist(hf_sd, cfg), args.dtype)
    save = hf_convert.save_torch if args.format == "torch" else hf_convert.save_dist_checkpoint
    out = save(args.out, sd, cfg)
    if args.config_out:
        Path(args.config_out).write_text(cfg.to_yaml())
    print(f"wrote {out} ({args.format}): {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
          f"vocabulary {cfg.model.vocab_size}")
    if base is not None:
        replaced = replaced_model_keys(base, cfg)
        if replaced:
            print(f"the model section comes from {Path(args.hf_dir) / 'config.json'}, not {args.config}: "
                  + "; ".join(replaced))
    if args.format == "dist":
        print(f"continue pretraining: effdist train --config {out / 'config.yaml'} --set checkpoint.init_from={out} "
              "(set data.* to your tokenized corpus)")


def effdist_to_hf(args: argparse.Namespace) -> None:
    cfg = load_config(args.config) if args.config else None
    path = ckpt.resolve(args.checkpoint)
    cfg, sd = hf_convert.load_effdist_model(path, cfg)
    out = hf_convert.save_hf_checkpoint(args.out, _cast(hf_convert.effdist_to_hf(sd, cfg), args.dtype), cfg)
    print(f"wrote {out} from {path}")


def _read_failure(e: BaseException) -> str | None:
    """A one-line reason when `e` is the checkpoint reader failing (corrupt or unreadable files)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, (CheckpointingException, CheckpointException)):
        text = str(e).strip().splitlines()
        return text[-1] if text else type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        _check_outputs(args)
        if args.direction in TO_EFFDIST:
            hf_to_effdist(args)
        else:
            effdist_to_hf(args)
    except (ConversionError, ConfigError, ckpt.CheckpointError) as e:
        print(f"effdist convert: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output that cannot be written (read-only, missing parent, a file in the way)
        print(f"effdist convert: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        reason = _read_failure(e)
        if reason is None:
            raise
        print(f"effdist convert: reading the checkpoint failed: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
