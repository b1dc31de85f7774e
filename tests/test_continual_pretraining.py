"""Continual pretraining from an HF LLaMA directory, end to end (docs/continual_pretraining.md): a tiny
random LlamaForCausalLM made here -> `effdist convert from-hf --format dist` -> `effdist train` with
checkpoint.init_from -> `effdist convert to-hf` on the run directory -> transformers loads it. The
commands a user types run as processes of their own (stderr as a user sees it); the conversions that
only set up a case run in this process.

The round trip before training is exact (the HF model's logits from the converted checkpoint and from
the model converted back); after training, the exported model gives the trained effdist model's logits.
A model of another shape than the run's config is refused with the misfit tensors listed (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from effdist.train.convert import main as convert_main
from hf_llama import make_llama
from launching import ROOT, TINY, clean_env

transformers = pytest.importorskip("transformers", reason="transformers (pyproject dev extra) builds the reference "
                                   "LlamaForCausalLM")

pytestmark = pytest.mark.slow

TOKENS = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))


def make_hf_model(path, num_layers=4, ffn=176):
    """A random LlamaForCausalLM; the defaults are tiny-cpu's shape (vocab 512, hidden 64, 4 heads, 2 groups)."""
    return make_llama(path, hidden_size=64, intermediate_size=ffn, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                      rms_norm_eps=1e-5)


def effdist(*args, timeout=400):
    env = clean_env()
    env.pop("PYTHONWARNINGS")  # the launcher's default hides every warning; a user's shell does not
    return subprocess.run([sys.executable, "-m", "effdist.cli", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def converted(proc):
    """A conversion that succeeded quietly: in a pipe, stdout says what was written and stderr stays empty
    (no progress bar, no third-party warnings)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]
    return proc


def hf_logits(path):
    model = transformers.LlamaForCausalLM.from_pretrained(path).float().eval()
    with torch.no_grad():
        return model(TOKENS).logits


def effdist_logits(path):
    """Logits of the effdist model (GPTModel, one process) held by checkpoint `path`, vocabulary unpadded."""
    from effdist.model.gpt import build_gpt
    from effdist.model.hf_convert import load_effdist_model
    from effdist.runtime.distributed import one_process_megatron

    with one_process_megatron():
        cfg, sd = load_effdist_model(path)
        cfg.epas.enabled = False
        model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
        model.load_state_dict(sd, strict=True)
        positions = torch.arange(TOKENS.shape[1]).unsqueeze(0).expand_as(TOKENS)
        with torch.no_grad():
            return model(TOKENS, positions, None)[..., :cfg.model.vocab_size]


def test_continual_pretraining_from_an_hf_directory(tmp_path):
    hf = make_hf_model(tmp_path / "hf")
    with torch.no_grad():
        original = hf(TOKENS).logits
    ckpt, run, data = tmp_path / "tinyllama", tmp_path / "run", tmp_path / "data"

    converted(effdist("convert", "from-hf", "--hf-dir", tmp_path / "hf", "--out", ckpt, "--format", "dist",
                      "--config", TINY))
    assert (ckpt / "config.yaml").is_file()
    # Before training, both ways: the converted checkpoint computes the HF logits, and converted back
    # (to-hf on the checkpoint directory) transformers loads the very same model.
    torch.testing.assert_close(effdist_logits(ckpt), original, rtol=1e-5, atol=1e-5)
    assert convert_main(["to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf_again")]) == 0
    torch.testing.assert_close(hf_logits(tmp_path / "hf_again"), original, rtol=0, atol=0)

    proc = effdist("train", "--config", ckpt / "config.yaml", "--run-dir", run, "--set", f"checkpoint.init_from={ckpt}",
                   "--set", "train.steps=2", "--set", f"data.cache_dir={data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised the model from {ckpt}" in proc.stderr

    # The run directory (its newest checkpoint) converts back; transformers loads it and computes what the
    # trained effdist model computes, which is no longer the original model.
    proc = converted(effdist("convert", "to-hf", "--checkpoint", run, "--out", tmp_path / "hf_trained"))
    assert "iter_0000002" in proc.stdout
    trained = hf_logits(tmp_path / "hf_trained")
    torch.testing.assert_close(trained, effdist_logits(run / "checkpoints" / "iter_0000002"), rtol=1e-5, atol=1e-5)
    assert (trained - original).abs().max() > 1e-3

    # A checkpoint of another shape than the run's config: every misfit tensor named, exit 2, no traceback.
    make_hf_model(tmp_path / "hf3", num_layers=3, ffn=96)
    assert convert_main(["from-hf", "--hf-dir", str(tmp_path / "hf3"), "--out", str(tmp_path / "three"),
                         "--format", "dist"]) == 0
    proc = effdist("train", "--config", TINY, "--run-dir", tmp_path / "misfit", "--set",
                   f"checkpoint.init_from={tmp_path / 'three'}", "--set", "train.steps=2", "--set",
                   f"data.cache_dir={data}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"checkpoint.init_from = '{tmp_path / 'three'}' does not fit this model (6 problem(s)):" in proc.stderr
    assert "  model.decoder.layers.input_layernorm.weight: expected [4, 64], the checkpoint has [3, 64]" in proc.stderr
    assert "  model.decoder.layers.mlp.linear_fc2.weight: expected [4, 64, 176], the checkpoint has [3, 64, 96]" \
        in proc.stderr
    assert ("  fix: train with the checkpoint's model shape (--set model.num_layers=3 --set model.ffn_hidden_size=96), "
            f"e.g. --config {tmp_path / 'three' / 'config.yaml'}") in proc.stderr
