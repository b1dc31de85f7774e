#!/usr/bin/env python
"""How redundant are Q, K and attention maps across layers? Measures them and suggests an EPAS region.

    python tools/layer_redundancy.py --hf-dir TinyLlama-1.1B --text sample.txt --png red.png --json red.json
    python tools/layer_redundancy.py --config configs/llama-350m.yaml --checkpoint runs/x/checkpoints/iter_0010000
    python tools/layer_redundancy.py --random-init --config configs/tiny-cpu.yaml    # smoke test

For every layer i it reports, against layer i-1: the cosine similarity of post-RoPE queries and of
keys (per token and head, averaged) and the overlap of attention maps, 1 - total-variation distance
of each query's attention distribution (1: identical maps). Because a sharing layer reuses the Q/K of
its region's *anchor* (the last layer before the region), the region suggested is the longest deep
suffix [L-k, L) whose every layer's attention overlap with anchor L-k-1 is at least --threshold.
Tokens come from --text (tokenised with --tokenizer, or the HF directory's tokenizer.json) or are
random (then the numbers only exercise the tool).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------- measurement

def capture_qk(model, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE (q, k) of every layer for `tokens` [b, s]: q [b, heads, s, d], k [b, kv_heads, s, d], fp32.

    Uses the EPAS layers' own export of packed Q/K (every layer exports, none shares).
    """
    from effdist.model.shared_qk import epas_layers, unpack_qk

    layers = epas_layers([model])
    if not layers:
        raise ValueError("the model has no EPAS layers: build it with epas.enabled = true")
    kept = {i: layer.keeps_export for i, layer in layers.items()}
    for layer in layers.values():
        layer.self_attention.sharing = False
        layer.self_attention.exports_qk = True
        layer.keeps_export = True
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    out = []
    try:
        with torch.no_grad():
            model(tokens, positions, None)
        for index in sorted(layers):
            layer = layers[index]
            q, k = unpack_qk(layer.exported_qk, layer.self_attention.num_attention_heads_per_partition)
            out.append((q.float().permute(1, 2, 0, 3).contiguous(), k.float().permute(1, 2, 0, 3).contiguous()))
    finally:
        for i, layer in layers.items():
            layer.self_attention.exports_qk = False
            layer.keeps_export = kept[i]
            layer.exported_qk = None
    return out


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d)) per query head, grouped K expanded: [b, heads, s, s]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = q.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def _overlap(p: torch.Tensor, r: torch.Tensor) -> float:
    return float(1.0 - 0.5 * (p - r).abs().sum(-1).mean())


def measure(model, batches: list[torch.Tensor]) -> dict:
    """Per-layer similarities averaged over `batches`; `attention_overlap[a][i]` for every pair a < i."""
    n = None
    q_cos = k_cos = overlap = None
    for tokens in batches:
        qk = capture_qk(model, tokens)
        if n is None:
            n = len(qk)
            q_cos, k_cos = [0.0] * n, [0.0] * n
            overlap = [[0.0] * n for _ in range(n)]
        probs = [attention_probs(q, k) for q, k in qk]
        for i in range(1, n):
            q_cos[i] += _cosine(qk[i][0], qk[i - 1][0]) / len(batches)
            k_cos[i] += _cosine(qk[i][1], qk[i - 1][1]) / len(batches)
            for a in range(i):
                overlap[a][i] += _overlap(probs[i], probs[a]) / len(batches)
        del probs
    for i in range(n):
        overlap[i][i] = 1.0
        for a in range(i):
            overlap[i][a] = overlap[a][i]
    return {"num_layers": n, "q_cosine_prev": [None] + q_cos[1:], "k_cosine_prev": [None] + k_cos[1:],
            "attention_overlap_prev": [None] + [overlap[i - 1][i] for i in range(1, n)],
            "attention_overlap": overlap}


def suggest_region(result: dict, threshold: float) -> dict:
    """Longest deep suffix whose layers all keep an attention overlap >= threshold with its anchor,
    and so does every shorter suffix (the progressive schedule grows the region through all of them)."""
    n, overlap = result["num_layers"], result["attention_overlap"]
    per_size = {}
    best = 0
    for size in range(1, n):
        anchor = n - size - 1
        worst = min(overlap[anchor][i] for i in range(anchor + 1, n))
        per_size[size] = worst
        if worst >= threshold and best == size - 1:
            best = size
    return {"threshold": threshold, "suggested_final_region": best,
            "worst_overlap_with_anchor_by_region_size": per_size}


def plot(result: dict, suggestion: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = result["num_layers"]
    layers = list(range(1, n))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax1.plot(layers, result["q_cosine_prev"][1:], "o-", label="Q cosine vs layer i-1")
    ax1.plot(layers, result["k_cosine_prev"][1:], "s-", label="K cosine vs layer i-1")
    ax1.plot(layers, result["attention_overlap_prev"][1:], "^-", label="attention overlap vs layer i-1")
    region = suggestion["suggested_final_region"]
    if region:
        ax1.axvspan(n - region - 0.5, n - 0.5, color="tab:green", alpha=0.12,
                    label=f"suggested region ({region} layers, threshold {suggestion['threshold']})")
    ax1.set_xlabel("layer i")
    ax1.set_ylabel("similarity")
    ax1.set_ylim(min(0.0, ax1.get_ylim()[0]), 1.02)
    ax1.legend(fontsize=8, loc="lower left")
    ax1.set_title("consecutive layers")
    im = ax2.imshow(result["attention_overlap"], vmin=0, vmax=1, cmap="viridis", origin="lower")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("layer")
    ax2.set_title("attention-map overlap, every pair")
    fig.colorbar(im, ax=ax2)
    for axis in (ax1.xaxis, ax2.xaxis, ax2.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- inputs

def load_model(args, device: torch.device, dtype: torch.dtype):
    from effdist.config import config_from_dict, load_config
    from effdist.model.gpt import build_gpt
    from effdist.model.hf_convert import config_from_hf, hf_to_effdist, load_effdist_model, load_hf_checkpoint

    base = load_config(args.config) if args.config else None
    if args.hf_dir:
        hf_config, hf_sd = load_hf_checkpoint(args.hf_dir)
        cfg = config_from_hf(hf_config, base)
        sd = hf_to_effdist(hf_sd, cfg)
    elif args.checkpoint:
        from effdist.train.checkpoint import resolve

        cfg, sd = load_effdist_model(resolve(args.checkpoint), base)
    else:
        cfg, sd = base or load_config(None), None
    cfg = config_from_dict(cfg.to_dict())
    cfg.epas.enabled = True
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sequence_parallel = 1, 1, False
    cfg.train.recompute = False
    model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, dtype, device)
    if sd is not None:
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    return cfg, model.eval()


def token_batches(args, cfg, device: torch.device) -> list[torch.Tensor]:
    n, b, s = args.batches, args.batch_size, min(args.seq, cfg.model.max_position_embeddings)
    if args.text:
        from tokenizers import Tokenizer

        tok_path = args.tokenizer or (Path(args.hf_dir) / "tokenizer.json" if args.hf_dir else None)
        if tok_path is None or not Path(tok_path).is_file():
            raise SystemExit("layer_redundancy: --text needs --tokenizer tokenizer.json (or an --hf-dir holding one)")
        ids = Tokenizer.from_file(str(tok_path)).encode(Path(args.text).read_text()).ids
        need = n * b * s
        if len(ids) < need:
            ids = (ids * (need // max(1, len(ids)) + 1))[:need]
        flat = torch.tensor(ids[:need]).clamp_(max=cfg.model.vocab_size - 1)
        return [t.to(device) for t in flat.view(n, b, s)]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, cfg.model.vocab_size, (b, s), generator=g).to(device) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="effdist model: a run directory (its newest complete checkpoint), its "
                     "checkpoints/ directory, one iter_NNNNNNN checkpoint, or what `effdist convert` wrote")
    src.add_argument("--hf-dir", help="Hugging Face LLaMA directory")
    src.add_argument("--random-init", action="store_true", help="a freshly initialised model (smoke test)")
    p.add_argument("--config", help="effdist YAML (the model for --random-init; needed by some checkpoints)")
    p.add_argument("--text", help="a text file to take token batches from (default: random tokens)")
    p.add_argument("--tokenizer", help="tokenizer.json for --text")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.8, help="minimum attention overlap with the anchor")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--png", help="write the plot here")
    p.add_argument("--json", help="write all numbers here")
    args = p.parse_args(argv)

    from effdist.model.hf_convert import one_process_megatron

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        import torch.distributed as dist
        from megatron.core import parallel_state, tensor_parallel

        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        context = torch.no_grad()
    else:
        context = one_process_megatron()
    from effdist.config import ConfigError
    from effdist.model.hf_convert import ConversionError
    from effdist.train.checkpoint import CheckpointError

    with context:
        try:
            cfg, model = load_model(args, device, dtype)
        except (CheckpointError, ConversionError, ConfigError) as e:  # a wrong --checkpoint/--config: one line
            print(f"layer_redundancy: {e}", file=sys.stderr)
            return 2
        result = measure(model, token_batches(args, cfg, device))
    suggestion = suggest_region(result, args.threshold)

    print(f"{'layer':>5} {'Q cos':>7} {'K cos':>7} {'attn overlap':>13}   (each vs the layer before)")
    for i in range(1, result["num_layers"]):
        print(f"{i:>5} {result['q_cosine_prev'][i]:>7.3f} {result['k_cosine_prev'][i]:>7.3f} "
              f"{result['attention_overlap_prev'][i]:>13.3f}")
    print(f"\nsuggested epas.final_region = {suggestion['suggested_final_region']} "
          f"(every sharing layer keeps attention overlap >= {args.threshold} with the anchor)")
    if args.png:
        plot(result, suggestion, args.png)
        print(f"plot: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, **suggestion, "source": args.hf_dir or args.checkpoint or
                                               "random-init", "random_tokens": not args.text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
