"""`effdist generate`: text from a training checkpoint, with a KV cache and a chosen EPAS region.

    effdist generate --checkpoint runs/tiny --prompt "The quick" [--epas-region 2] [--max-new-tokens 64]
                     [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0]

    gen = Generator.from_checkpoint("runs/tiny", epas_region=2)       # Python API, batched
    out = gen.generate(["The quick", "Once upon"], max_new_tokens=32)  # out.texts, out.tokens

The checkpoint (a run directory, its ``checkpoints/`` folder, one ``iter_NNNNNNN`` directory, or a
model written by ``effdist convert``) may have been trained with any TP/PP layout: megatron's
dist_checkpointing reshards it into a TP=1 model in this process, whose weights feed the inference
forward of effdist.infer.model (prefill with SDPA, then cached decode).

The EPAS region is chosen per call: one checkpoint serves any region 0..layers-1. A region longer
than the one the checkpoint was trained with (its saved EPAS state, else its config) is allowed
with a warning (quality degrades); a region of layers or more is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from effdist.infer.cache import KVCache, SharingPlan, kv_cache_bytes
from effdist.infer.graphs import DecodeRunner
from effdist.infer.model import SUPPORTED_FFN_KINDS, InferenceModel, UnsupportedModelError
from effdist.infer.region_quality import RegionQuality, read_region_quality
from effdist.runtime.cli_parser import ArgumentParser

Prompt = Union[str, Sequence[int], torch.Tensor]


class GenerationError(ValueError):
    """Generation cannot run as asked; the message names the input and the fix."""


class GenerationWarning(UserWarning):
    """Generation runs, but not quite as asked (e.g. fewer new tokens than requested)."""


class RegionWarning(GenerationWarning):
    """The EPAS region asked for is longer than the one the checkpoint was trained with."""


# ---------------------------------------------------------------------------------------- checkpoints

@dataclass
class CheckpointInfo:
    """What a checkpoint path resolves to: the directory (or file) holding the weights and its config."""

    path: Path
    config: object  # effdist.config.Config
    kind: str  # training | converted-dist | converted-file
    run_dir: Optional[Path] = None
    step: Optional[int] = None
    # Sharing layers the model was trained with (its EPAS state), None when the checkpoint has no state.
    trained_region: Optional[int] = None
    # When the training checkpoint was saved (its effdist.json): tells two checkpoints of one step apart.
    saved_at: Optional[float] = None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory (or model file) that `path` names: itself, or the newest one under it."""
    from effdist.train.checkpoint import CheckpointError, resolve

    try:
        return resolve(path)
    except CheckpointError as e:
        raise GenerationError(f"--checkpoint {e}") from None


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    from effdist.config import config_from_dict
    from effdist.train.checkpoint import MARKER, read_marker

    resolved = resolve_checkpoint(path)
    if resolved.is_file():
        from effdist.model.hf_convert import ConversionError, load_torch

        try:
            cfg, _ = load_torch(resolved)
        except ConversionError as e:
            raise GenerationError(str(e)) from None
        return CheckpointInfo(resolved, cfg, "converted-file", run_dir=None,
                              trained_region=_region_from_config(cfg))
    if (resolved / MARKER).is_file():
        from effdist.model.hf_convert import ConversionError, refuse_other_engines

        try:
            refuse_other_engines(resolved)
        except ConversionError as e:
            raise GenerationError(str(e)) from None
        marker = read_marker(resolved)
        if "config" not in marker:
            raise GenerationError(f"{resolved}/{MARKER} holds no resolved config; it was written by an older effdist")
        cfg = config_from_dict(marker["config"])
        run_dir = _run_dir_of(Path(path), resolved)
        region = _region_from_state(resolved)
        return CheckpointInfo(resolved, cfg, "training", run_dir=run_dir, step=marker.get("step"),
                              trained_region=region if region is not None else _region_from_config(cfg),
                              saved_at=marker.get("saved_at"))
    cfg = config_from_dict(json.loads((resolved / "effdist_model.json").read_text())["config"])
    return CheckpointInfo(resolved, cfg, "converted-dist", trained_region=_region_from_config(cfg))


def _run_dir_of(given: Path, resolved: Path) -> Optional[Path]:
    """The run directory of training checkpoint `resolved` (its tokenizer and data live there): the directory
    given on the command line when it is the run's (the only way to know it with checkpoint.dir elsewhere), else
    the parent of its checkpoints/ directory."""
    if given.is_dir() and given != resolved and (given / "config.yaml").is_file():
        return given
    return resolved.parent.parent if resolved.parent.name == "checkpoints" else None


def _region_from_state(path: Path) -> Optional[int]:
    """The region the EPAS controller saved with the checkpoint (None for runs without EPAS state)."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception:  # no common state: fall back to the config
        return None
    epas = (common.get("common") or {}).get("epas") if isinstance(common, dict) else None
    return int(epas["region"]) if isinstance(epas, dict) and "region" in epas else None


def _region_from_config(cfg) -> int:
    if not cfg.epas.enabled:
        return 0
    from effdist.epas.schedule import final_region_size

    return final_region_size(cfg.epas, cfg.model.num_layers)


def load_weights(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The TP=1 state dict of the checkpoint's model (resharded by dist_checkpointing), on the CPU."""
    from effdist.config import config_from_dict
    from effdist.model.hf_convert import load_dist_checkpoint, load_torch

    if info.kind == "converted-file":
        return load_torch(info.path)[1]
    # The embedding was padded for the TP size it was saved with; keep that padding at TP=1.
    cfg = config_from_dict(info.config.to_dict())
    cfg.model.make_vocab_size_divisible_by *= cfg.parallel.tp
    return load_dist_checkpoint(info.path, cfg)


def find_tokenizer(info: CheckpointInfo, explicit: Optional[str] = None):
    """(tokenizer, None) or (None, the places looked at) for the checkpoint's training data."""
    from effdist.data.tokenizer import load_tokenizer
    from effdist.data.verify import DataError

    if explicit is not None:
        try:
            tok = load_tokenizer(explicit)
        except DataError as e:
            raise GenerationError(f"--tokenizer: {e}") from None
        _warn_if_not_the_training_tokenizer(info, tok)
        return tok, None
    cfg = info.config
    bases = [b for b in (Path.cwd(), info.run_dir) if b is not None]
    candidates: list[Path] = []
    if cfg.data.tokenizer:
        t = Path(cfg.data.tokenizer)
        candidates += [t] if t.is_absolute() else [b / t for b in bases]
    if cfg.data.kind == "sample" and info.run_dir is not None:
        from effdist.data.loader import sample_data_dir

        candidates.append(sample_data_dir(cfg, info.run_dir) / "tokenizer.json")
        if cfg.data.cache_dir and not Path(cfg.data.cache_dir).is_absolute():  # relative to where training ran
            candidates.append(info.run_dir / sample_data_dir(cfg, info.run_dir) / "tokenizer.json")
    for d in (info.path if info.path.is_dir() else info.path.parent, info.run_dir):
        if d is not None:
            candidates.append(d / "tokenizer.json")
    for c in candidates:
        p = c / "tokenizer.json" if c.is_dir() else c
        if p.is_file():
            try:
                return load_tokenizer(p), None
            except DataError:
                continue
    return None, [str(c) for c in dict.fromkeys(candidates)]


def _warn_if_not_the_training_tokenizer(info: CheckpointInfo, tok) -> None:
    """A --tokenizer other than the one the training data was tokenized with (its .meta.json records the file's
    sha256) decodes the model's ids into other text: say so, naming the one that was used."""
    from effdist.data.preprocess import read_meta

    cfg = info.config
    bases = [b for b in (Path.cwd(), info.run_dir) if b is not None]
    prefixes = [Path(p) for p in cfg.data.paths]
    if cfg.data.kind == "sample" and info.run_dir is not None:
        from effdist.data.loader import SAMPLE_PREFIX_NAME, sample_data_dir

        prefixes.append(sample_data_dir(cfg, info.run_dir) / SAMPLE_PREFIX_NAME)
    for prefix in prefixes:
        for base in ([prefix] if prefix.is_absolute() else [b / prefix for b in bases]):
            meta = read_meta(base)
            if meta and meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != tok.sha256():
                warnings.warn(f"--tokenizer {tok.path} is not the tokenizer the training data {base} was made with "
                              f"({meta.get('tokenizer', 'see its .meta.json')}): the text will not be what the model "
                              "means", GenerationWarning, stacklevel=2)
                return
            if meta:
                return


# ---------------------------------------------------------------------------------------- sampling

def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row of `logits` [b, vocab]: greedy for temperature 0, else sampled from the
    temperature-scaled distribution restricted to the top_k tokens and the top_p probability mass."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass (the first always stays).
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------- generation

@dataclass
class Generation:
    """The result of one batched `Generator.generate` call."""

    prompt_tokens: list[list[int]]
    tokens: list[list[int]]  # new tokens per prompt, up to (not including) the end-of-document token
    finish_reasons: list[str]  # "eod" | "length"
    region: int
    sharing_layers: list[int]
    texts: Optional[list[str]] = None
    # K/V bytes of the slots this call used (prompt + new tokens, whole batch), and what the dense
    # model (region 0) would have needed for the same slots.
    kv_cache_bytes: int = 0
    dense_kv_cache_bytes: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        batch = len(self.tokens)
        return batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def _layer_names(layers: Sequence[int]) -> str:
    """The layers as a warning names them: `layer 3`, or `layers 2, 3`."""
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"


class Generator:
    """Batched generation from an `InferenceModel` with a KV cache and a per-call EPAS region."""

    def __init__(self, model: InferenceModel, *, tokenizer=None, trained_region: Optional[int] = 0,
                 direction: str = "deep_to_shallow", default_region: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None, tokenizer_search: Optional[list[str]] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.trained_region = trained_region
        self.direction = direction
        self.default_region = (trained_region or 0) if default_region is None else default_region
        self.cuda_graphs = cuda_graphs
        self.tokenizer_search = tokenizer_search
        self._runner: Optional[DecodeRunner] = None
        self.checkpoint: Optional[CheckpointInfo] = None  # set by from_checkpoint
        # What `effdist eval` measured for this checkpoint (RUN_DIR/region_quality.json), set by from_checkpoint.
        self.region_quality: Optional[RegionQuality] = None
        self.plan_for(self.default_region, warn=False)  # check it now, warn when it is used

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: Optional[str | torch.device] = None,
                        dtype: Optional[str | torch.dtype] = None, epas_region: Optional[int] = None,
                        tokenizer: Optional[str] = None, cuda_graphs: Optional[bool] = None,
                        sparse_decode: bool = True) -> "Generator":
        """Load a (possibly TP/PP-sharded) training checkpoint into this process. `device` defaults to
        CUDA when available, `dtype` to bf16 on CUDA and fp32 on CPU; `epas_region` is the default
        region of later calls (else ``epas.inference_region`` of the config, else the trained region);
        ``sparse_decode=False`` decodes sparse FFNs (MoC, top-k, ELAS, ReLU²) with their dense math."""
        device = _parse_device(device)
        dtype = _parse_dtype(dtype, device)
        for attempt in range(3):
            info = read_checkpoint_info(path)
            cfg = info.config
            check_supported(cfg)
            tok, searched = find_tokenizer(info, tokenizer)
            if tok is not None and tok.vocab_size > cfg.model.vocab_size:
                where = f"--tokenizer {tokenizer}" if tokenizer is not None else f"the tokenizer {tok.path}"
                raise GenerationError(f"{where} has {tok.vocab_size} entries but the model was trained with "
                                      f"model.vocab_size {cfg.model.vocab_size}: its ids would index past the "
                                      "embedding; give the tokenizer the run trained with")
            try:
                weights = load_weights(info)
                break
            except Exception:
                if info.path.exists():
                    raise
                # A run training there saved a newer checkpoint and its checkpoint.keep_last / keep_every removed
                # this one while it was read: a run directory's newest is read again; a named checkpoint is gone.
                if attempt == 2 or Path(path).resolve() == info.path.resolve():
                    raise GenerationError(
                        f"checkpoint {info.path} was deleted while it was read (a run training there removes older "
                        "checkpoints: checkpoint.keep_last, keep_every); give its run directory to read the newest "
                        "one, or a checkpoint the run keeps") from None
        model = InferenceModel.from_state_dict(weights, cfg, step=info.step,
                                               sparse_decode=sparse_decode).to(device=device, dtype=dtype)
        default = epas_region if epas_region is not None else cfg.epas.inference_region
        gen = cls(model, tokenizer=tok, trained_region=info.trained_region, direction=cfg.epas.direction,
                  default_region=default, cuda_graphs=cuda_graphs, tokenizer_search=searched)
        gen.checkpoint = info
        gen.region_quality = read_region_quality(info.run_dir, info.step, info.saved_at)
        return gen

    # ------------------------------------------------------------------ regions
    def plan_for(self, region: Optional[int], warn: bool = True) -> SharingPlan:
        """The sharing layers of `region` (None: the default); warns at a region other than the trained one, and
        at a region `effdist eval` measured outside the usable ones."""
        num_layers = self.model.shape.num_layers
        region = self.default_region if region is None else region
        if isinstance(region, bool) or not isinstance(region, int) or region < 0:
            raise GenerationError(f"epas region = {region!r}: must be a whole number of sharing layers >= 0")
        if region > num_layers - 1:
            raise GenerationError(f"epas region = {region}: this model has {num_layers} layers, so at most "
                                  f"{num_layers - 1} can share Q/K (layer 0 has no layer above it)")
        plan = SharingPlan.for_region(num_layers, region, self.direction)
        trained = self.trained_region
        if warn and trained is not None and region > trained:
            which = _layer_names(self._sharing_in_first_only(region, trained))
            warnings.warn(f"epas region = {region} is longer than the {trained} sharing layers this checkpoint was "
                          f"trained with: {which} never learned to reuse Q/K, expect worse text",
                          RegionWarning, stacklevel=3)  # the caller of generate
        quality = self.region_quality
        measured = quality is not None and region in quality.losses
        if warn and trained is not None and region < trained and not measured:
            warnings.warn(self._shorter_region_warning(region, trained), RegionWarning,
                          stacklevel=3)  # the caller of generate
        if warn and measured and region not in quality.usable:
            warnings.warn(f"epas region = {region}: its held-out loss is {quality.excess(region):+.2%} against the "
                          f"trained region's ({quality.trained_region}) in {quality.path} (`effdist eval`); regions "
                          f"within {quality.tolerance:.1%}: {', '.join(map(str, quality.usable))}",
                          RegionWarning, stacklevel=3)
        return plan

    def _sharing_in_first_only(self, region: int, other: int) -> list[int]:
        """The layers that share Q/K at `region` and not at `other`, in order."""
        num_layers = self.model.shape.num_layers
        return sorted(SharingPlan.for_region(num_layers, region, self.direction).sharing
                      - SharingPlan.for_region(num_layers, other, self.direction).sharing)

    def _shorter_region_warning(self, region: int, trained: int) -> str:
        """Why a region shorter than the trained one costs quality: its layers that no longer share compute their
        own Q/K again, with projections that stopped training when the layer began to share (llama-1b trained to
        region 12 from scratch: +16.9% held-out loss at regions 0, 4 and 8, two seeds; docs/epas.md, "Choosing an
        inference region")."""
        num_layers = self.model.shape.num_layers
        own = self._sharing_in_first_only(trained, region)
        which = _layer_names(own)
        since = ""
        info = self.checkpoint
        if info is not None and info.config.epas.enabled and info.config.epas.mode != "adaptive":
            from effdist.epas.schedule import join_step

            steps = sorted({join_step(info.config.epas, num_layers, layer) for layer in own} - {None})
            if steps:
                span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
                since = f" since {span} of {info.step}" if info.step is not None else f" since {span}"
        before = (" (they trained before, in checkpoint.init_from's run, which may keep the cost small)"
                  if info is not None and info.config.checkpoint.init_from else "")
        return (f"epas region = {region} is shorter than the {trained} sharing layers this checkpoint was trained "
                f"with: {which} {'computes its' if len(own) == 1 else 'compute their'} own Q/K again, whose "
                f"projections have not trained{since}{before}; "
                f"expect worse text unless `effdist eval --checkpoint ...` measures region {region} within 0.5%")

    # ------------------------------------------------------------------ prompts
    def encode(self, prompts: Union[Prompt, Sequence[Prompt]]) -> list[list[int]]:
        one_id_list = isinstance(prompts, (list, tuple)) and bool(prompts) and all(isinstance(t, int) for t in prompts)
        if isinstance(prompts, str) or one_id_list or (torch.is_tensor(prompts) and prompts.dim() == 1):
            prompts = [prompts]
        elif torch.is_tensor(prompts):
            prompts = list(prompts)
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    where = (f" (looked at {', '.join(self.tokenizer_search)})" if self.tokenizer_search else "")
                    raise GenerationError(f"prompt {i} is text but no tokenizer was found for this checkpoint{where}; "
                                          "pass --tokenizer PATH/tokenizer.json (tokenizer= in Python), or give "
                                          "token ids (--prompt-ids)")
                ids = self.tokenizer.encode(p)
                if not ids:  # an empty prompt starts a new document
                    ids = [self.tokenizer.eod]
            else:
                ids = [int(t) for t in (p.tolist() if torch.is_tensor(p) else p)]
                if not ids:
                    # An empty text prompt starts a new document (the tokenizer's end-of-document id); ids carry
                    # no tokenizer to say which id that is, so the caller names it.
                    raise GenerationError(f"prompt {i} has no tokens: give at least one token id (the "
                                          "end-of-document id starts a new document), or an empty text prompt "
                                          "(--prompt '') with a tokenizer")
            bad = [t for t in ids if not 0 <= t < self.model.shape.vocab_size]
            if bad:
                raise GenerationError(f"prompt {i} holds token ids {bad[:5]} outside the vocabulary "
                                      f"0..{self.model.shape.vocab_size - 1}")
            out.append(ids)
        if not out:
            raise GenerationError("no prompts given")
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None, epas_region: Optional[int] = None, stop_at_eod: bool = True,
                 use_cache: bool = True, reuse_attention: bool = True) -> Generation:
        """Continue every prompt (text, or token ids) by up to `max_new_tokens` tokens.

        Greedy when temperature is 0 (default). ``use_cache=False`` recomputes the whole sequence at
        every step (a reference for the cached path); ``reuse_attention=False`` makes sharing layers
        recompute their attention in decode instead of reusing their anchor's probabilities.
        """
        if max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens = {max_new_tokens}: must be >= 1")
        if not temperature >= 0 or temperature == float("inf"):  # NaN fails the comparison
            raise GenerationError(f"temperature = {temperature}: must be a finite number >= 0 (0 = greedy)")
        if top_k is not None and top_k < 0:
            raise GenerationError(f"top_k = {top_k}: must be >= 0 (0 or None = no limit)")
        if top_p is not None and not 0 < top_p <= 1:
            raise GenerationError(f"top_p = {top_p}: must lie in (0, 1] (1 = no limit)")
        plan = self.plan_for(epas_region)
        shape, device = self.model.shape, self.model.device
        prompt_ids = self.encode(prompts)
        longest = max(len(p) for p in prompt_ids)
        if longest >= shape.max_positions:
            raise GenerationError(f"a prompt has {longest} tokens; the model's max_position_embeddings is "
                                  f"{shape.max_positions}, which leaves no room for a new token: shorten the prompt "
                                  f"to at most {shape.max_positions - 1} tokens")
        if longest + max_new_tokens > shape.max_positions:
            allowed = shape.max_positions - longest
            warnings.warn(f"max_new_tokens = {max_new_tokens} would run past max_position_embeddings = "
                          f"{shape.max_positions} for a {longest}-token prompt; generating at most {allowed}",
                          GenerationWarning, stacklevel=2)
            max_new_tokens = allowed
        batch = len(prompt_ids)
        tokens = torch.zeros(batch, longest, dtype=torch.long)
        valid = torch.zeros(batch, longest, dtype=torch.bool)
        for i, ids in enumerate(prompt_ids):  # left padding: every prompt ends at the same slot
            tokens[i, longest - len(ids):] = torch.tensor(ids)
            valid[i, longest - len(ids):] = True

        vocab = shape.vocab_size if self.tokenizer is None else min(shape.vocab_size, self.tokenizer.vocab_size)
        eod = self.tokenizer.eod if (self.tokenizer is not None and stop_at_eod) else None
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed if seed is not None else torch.seed())

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return sample_next(logits[:, :vocab], temperature, top_k, top_p, rng)

        with torch.inference_mode():
            new, prefill_s, decode_s = self._run(plan, tokens.to(device), valid.to(device), max_new_tokens, pick,
                                                 eod, use_cache, reuse_attention)

        generated = torch.stack(new, dim=1).cpu().tolist()
        out_tokens, reasons = [], []
        for row in generated:
            if eod is not None and eod in row:
                out_tokens.append(row[:row.index(eod)])
                reasons.append("eod")
            else:
                out_tokens.append(row)
                reasons.append("length")
        slots = longest + len(new)
        heads, head_dim, dtype = shape.num_kv_heads, shape.head_dim, self.model.dtype
        result = Generation(
            prompt_tokens=prompt_ids, tokens=out_tokens, finish_reasons=reasons, region=plan.region,
            sharing_layers=sorted(plan.sharing),
            kv_cache_bytes=kv_cache_bytes(plan, batch, slots, heads, head_dim, dtype),
            dense_kv_cache_bytes=kv_cache_bytes(SharingPlan.dense(shape.num_layers), batch, slots, heads, head_dim,
                                                dtype),
            prefill_s=prefill_s, decode_s=decode_s, decode_steps=len(new) - 1)
        if self.tokenizer is not None:
            result.texts = [self.tokenizer.decode(t) for t in out_tokens]
        return result

    def _run(self, plan, tokens, valid, max_new_tokens, pick, eod, use_cache, reuse_attention):
        """Prefill, then up to max_new_tokens - 1 decode steps; returns (new tokens per step, prefill s, decode s)."""
        batch, device = tokens.shape[0], tokens.device
        runner = (self._runner_for(plan, batch, tokens.shape[1] + max_new_tokens, reuse_attention)
                  if use_cache else None)
        new: list[torch.Tensor] = []
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        timer = _Timer(device)
        if runner is not None:
            logits = self.model.prefill(tokens, plan, runner.cache, valid)
        else:
            logits = self.model(tokens, plan, valid)[:, -1]
        prefill_s = timer.lap()
        for step in range(max_new_tokens):
            nxt = pick(logits)
            new.append(nxt)
            if eod is not None:
                finished |= nxt == eod
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break
            if runner is not None:
                runner.cache.tokens.copy_(nxt)
                logits = runner.step()
                runner.cache.advance()
            else:  # the reference: the whole sequence again, no cache
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
                logits = self.model(tokens, plan, valid)[:, -1]
        return new, prefill_s, timer.lap()

    def _runner_for(self, plan: SharingPlan, batch: int, slots: int, reuse_attention: bool) -> DecodeRunner:
        """A decode runner whose cache fits; the last one is kept, with its CUDA graphs, for the next call."""
        model = self.model
        r = self._runner
        if (r is not None and r.cache.fits(plan, batch, slots, model.dtype, model.device)
                and r.reuse_attention == reuse_attention):
            return r
        self._runner = None  # free the old cache before allocating the new one
        # Room for a little more than this call needs, so that similar calls reuse cache and graphs.
        max_len = min(model.shape.max_positions, -(-slots // 128) * 128)
        cache = KVCache(plan, batch, max_len, model.shape.num_kv_heads, model.shape.head_dim, model.dtype,
                        model.device)
        self._runner = DecodeRunner(model, cache, reuse_attention=reuse_attention, cuda_graphs=self.cuda_graphs)
        return self._runner


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        dt, self.t = now - self.t, now
        return dt


def check_supported(cfg) -> None:
    """Raise UnsupportedModelError before loading weights the inference forward cannot run."""
    from effdist.model.ffn import ffn_kind_of_layer

    kinds = {ffn_kind_of_layer(cfg, i) for i in range(cfg.model.num_layers)}
    bad = sorted(kinds - set(SUPPORTED_FFN_KINDS))
    if bad:
        raise UnsupportedModelError(f"ffn.kind = {cfg.ffn.kind!r}: effdist.infer runs "
                                    f"{', '.join(SUPPORTED_FFN_KINDS)} FFNs only (this model has {', '.join(bad)})")


@contextlib.contextmanager
def _quiet_megatron():
    """megatron logs a warning per layer while building the model the checkpoint is loaded into."""
    logger = logging.getLogger("megatron")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _parse_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise GenerationError(f"--dtype {dtype!r}: valid: auto, fp32, bf16, fp16")
    return names[dtype]


# ---------------------------------------------------------------------------------------- CLI

def build_arg_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="effdist generate", description="Generate text from an effdist checkpoint "
                       "with a KV cache and a chosen EPAS sharing region.")
    p.add_argument("--checkpoint", required=True,
                   help="RUN_DIR, RUN_DIR/checkpoints, RUN_DIR/checkpoints/iter_NNNNNNN, or an `effdist convert` "
                        "output")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="prompt as comma-separated token ids (repeatable; for models without a tokenizer)")
    p.add_argument("--epas-region", type=int, default=None,
                   help="sharing layers (0 = dense); default: epas.inference_region, else the trained region")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0: reproducible)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one the run trained with)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on GPU")
    p.add_argument("--dense-ffn-decode", action="store_true",
                   help="decode MoC/top-k/ELAS/ReLU² FFNs with their dense math instead of the sparse gather-GEMV path")
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _parse_device(device: Optional[str | torch.device]) -> torch.device:
    """--device: cpu or cuda[:N]; None is CUDA when available. A device this torch cannot use is a usage error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise GenerationError(f"--device {device!r}: expected cpu or cuda[:N]") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerationError(f"--device {device}: this torch sees no CUDA GPU; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise GenerationError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif parsed.type != "cpu":
        raise GenerationError(f"--device {device!r}: expected cpu or cuda[:N]")
    return parsed


def main(argv: list[str] | None = None) -> int:
    from effdist.config import ConfigError
    from effdist.train.checkpoint import CheckpointError

    args = build_arg_parser().parse_args(argv)
    caught: list[warnings.WarningMessage] = []
    try:
        prompts: list[Prompt] = list(args.prompt)
        for ids in args.prompt_ids:
            try:
                prompts.append([int(t) for t in ids.replace(" ", "").split(",") if t])
            except ValueError:
                raise GenerationError(f"--prompt-ids {ids!r}: expected comma-separated integers, "
                                      "e.g. 12,7,301") from None
        if not prompts:
            raise GenerationError("give at least one --prompt TEXT or --prompt-ids IDS")
        with warnings.catch_warnings(record=True) as caught, _quiet_megatron():
            # What the user should know (region, length) is reported; megatron's and torch's notes are not.
            warnings.filterwarnings("ignore", module=r"(megatron|torch)(\.|$)")
            warnings.filterwarnings("always", category=GenerationWarning)
            gen = Generator.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                            epas_region=args.epas_region, tokenizer=args.tokenizer,
                                            cuda_graphs=False if args.no_cuda_graphs else None,
                                            sparse_decode=not args.dense_ffn_decode)
            out = gen.generate(prompts, args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k or None, top_p=args.top_p, seed=args.seed,
                               stop_at_eod=not args.ignore_eod)
    except (GenerationError, UnsupportedModelError, ConfigError, CheckpointError) as e:
        print(f"effdist generate: error: {e}", file=sys.stderr)
        return 2
    finally:
        for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, GenerationWarning)):
            print(f"effdist generate: warning: {message}", file=sys.stderr)
    info = gen.checkpoint
    if args.json:
        print(json.dumps({"checkpoint": str(info.path), "region": out.region, "sharing_layers": out.sharing_layers,
                          "trained_region": gen.trained_region, "prompt_tokens": out.prompt_tokens,
                          "tokens": out.tokens, "texts": out.texts, "finish_reasons": out.finish_reasons,
                          "kv_cache_bytes": out.kv_cache_bytes, "dense_kv_cache_bytes": out.dense_kv_cache_bytes,
                          "prefill_s": out.prefill_s, "decode_s": out.decode_s,
                          "decode_tokens_per_s": out.decode_tokens_per_s}, indent=1))
    else:
        for i, (prompt, new) in enumerate(zip(prompts, out.tokens)):
            if out.texts is not None:
                shown = prompt if isinstance(prompt, str) else gen.tokenizer.decode(out.prompt_tokens[i])
                print(f"[{i}] {shown}{out.texts[i]}")
            else:
                print(f"[{i}] {out.prompt_tokens[i]} -> {new}")
    ratio = out.kv_cache_bytes / out.dense_kv_cache_bytes
    made = f"step {info.step}" if info.step is not None else "converted model"
    print(f"[effdist] {info.path} ({made}), EPAS region {out.region} of {gen.model.shape.num_layers - 1} "
          f"(trained: {gen.trained_region}), {gen.model.device.type}/{str(gen.model.dtype).replace('torch.', '')}; "
          f"KV cache {out.kv_cache_bytes / 2**20:.3f} MiB = {ratio:.3f} x dense; "
          f"decode {out.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
