"""HF LLaMA <-> effdist conversion: a small random LlamaForCausalLM made here gives the same logits
once converted (fp32), and converting back reproduces its tensors bit for bit, through the
functions and through `effdist convert` (torch file and dist_checkpointing directory)."""

from __future__ import annotations

import os

import pytest
import torch

from hf_llama import make_llama
from effdist.model.hf_convert import (
    ConversionError,
    config_from_hf,
    effdist_to_hf,
    hf_to_effdist,
    load_hf_checkpoint,
    load_torch,
    one_process_megatron,
)
from effdist.train.convert import main

transformers = pytest.importorskip("transformers", reason="transformers (pyproject dev extra) builds the reference "
                                   "LlamaForCausalLM")

VOCAB = 100  # pads to 128 in effdist: the padding must vanish again on the way back


@pytest.fixture(scope="module", autouse=True)
def megatron_one_process():
    with one_process_megatron():
        yield


def make_hf_model(tmp_path, tie: bool = False, **overrides):
    path = tmp_path / ("hf_tied" if tie else "hf")
    config = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie)
    return make_llama(path, **dict(config, **overrides)), path


def effdist_logits(cfg, sd, tokens, epas_region: int | None = None):
    from effdist.config import config_from_dict
    from effdist.epas import set_region
    from effdist.model.gpt import build_gpt

    cfg = config_from_dict(cfg.to_dict())
    if epas_region is not None:
        cfg.epas.enabled = True
    model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
    model.load_state_dict(sd, strict=True)
    if epas_region is not None:
        set_region([model], epas_region)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


@pytest.mark.parametrize("tie", [False, True])
def test_converted_model_gives_the_hf_logits(tmp_path, tie):
    hf_model, path = make_hf_model(tmp_path, tie=tie)
    hf_config, hf_sd = load_hf_checkpoint(path)
    cfg = config_from_hf(hf_config)
    assert (cfg.model.num_query_groups, cfg.model.tie_embeddings, cfg.model.vocab_size) == (2, tie, VOCAB)
    sd = hf_to_effdist(hf_sd, cfg)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
    for region in (None, 0):  # the plain model, and the EPAS model at region 0
        got = effdist_logits(cfg, sd, tokens, epas_region=region)
        assert got.shape == (2, 24, 128)
        torch.testing.assert_close(got[..., :VOCAB], expected, rtol=1e-5, atol=1e-5)
    # A sharing region changes the function (the comparison can fail).
    shared = effdist_logits(cfg, sd, tokens, epas_region=2)
    assert (shared[..., :VOCAB] - expected).abs().max() > 1e-3


def test_round_trip_is_exact(tmp_path):
    _, path = make_hf_model(tmp_path)
    hf_config, hf_sd = load_hf_checkpoint(path)
    cfg = config_from_hf(hf_config)
    back = effdist_to_hf(hf_to_effdist(hf_sd, cfg), cfg)
    assert back.keys() == hf_sd.keys()
    for k, v in hf_sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_any_vocabulary_padding_converts_back(tmp_path):
    """A checkpoint trained at TP=2 (vocabulary padded to a multiple of 128) loads at TP=1 with another
    padding; converting it to HF keeps the real rows whatever the padding."""
    _, path = make_hf_model(tmp_path, vocab_size=130)
    hf_config, hf_sd = load_hf_checkpoint(path)
    cfg = config_from_hf(hf_config)
    sd = hf_to_effdist(hf_sd, cfg)
    assert sd["embedding.word_embeddings.weight"].shape[0] == 192
    cfg.parallel.tp = 2  # as saved by a TP=2 run: the config pads to 256, the TP=1 model holds 192 rows
    back = effdist_to_hf(sd, cfg)
    assert all(torch.equal(back[k], v) for k, v in hf_sd.items())
    short = dict(sd, **{"output_layer.weight": sd["output_layer.weight"][:100]})
    with pytest.raises(ConversionError, match=r"output_layer.weight: expected \[256, 64\], the effdist checkpoint "
                                              r"has \[100, 64\]"):
        effdist_to_hf(short, cfg)


@pytest.mark.parametrize("fmt", ["torch", "dist"])
def test_convert_command_both_ways(tmp_path, fmt, capsys):
    hf_model, path = make_hf_model(tmp_path)
    out = tmp_path / ("model.pt" if fmt == "torch" else "model_dist")
    assert main(["hf-to-effdist", "--hf-dir", str(path), "--out", str(out), "--format", fmt,
                 "--config-out", str(tmp_path / "cfg.yaml")]) == 0
    from effdist.config import load_config

    cfg = load_config(tmp_path / "cfg.yaml")
    assert cfg.model.num_layers == 3 and cfg.model.ffn_hidden_size == 96
    if fmt == "torch":
        saved_cfg, sd = load_torch(out)
        assert saved_cfg.model == cfg.model
        assert torch.equal(sd["decoder.layers.1.mlp.linear_fc2.weight"], hf_model.model.layers[1].mlp.down_proj.weight)
    from effdist.infer.generate import main as generate

    assert generate(["--checkpoint", str(out), "--prompt-ids", "1,2", "--max-new-tokens", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"{out} (converted model), EPAS region 0" in err and "step None" not in err, err
    back_dir = tmp_path / "hf_back"
    assert main(["effdist-to-hf", "--checkpoint", str(out), "--out", str(back_dir)]) == 0
    _, original = load_hf_checkpoint(path)
    _, back = load_hf_checkpoint(back_dir)
    assert back.keys() == original.keys()
    for k in original:
        assert torch.equal(back[k], original[k]), k
    reloaded = transformers.LlamaForCausalLM.from_pretrained(back_dir).float().eval()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, hf_model(tokens).logits, rtol=0, atol=0)


def test_conversions_replace_nothing_unasked(tmp_path, capsys):
    """A conversion into a run directory replaced its config.yaml; into an earlier export it replaced the model
    silently, or left other shards beside the new model.safetensors."""
    _, path = make_hf_model(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("mine\n")
    (run / "metrics.jsonl").write_text("")
    assert main(["from-hf", "--hf-dir", str(path), "--out", str(run), "--format", "dist", "--overwrite"]) == 2
    assert f"--out {run} is a training run directory (it holds metrics.jsonl, checkpoints)" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "mine\n"

    pt = tmp_path / "model.pt"
    assert main(["from-hf", "--hf-dir", str(path), "--out", str(pt)]) == 0
    before = pt.read_bytes()
    assert main(["from-hf", "--hf-dir", str(path), "--out", str(pt), "--dtype", "bf16"]) == 2
    assert f"--out {pt} exists: give a new name, or --overwrite to replace it" in capsys.readouterr().err
    assert pt.read_bytes() == before
    assert main(["from-hf", "--hf-dir", str(path), "--out", str(pt), "--dtype", "bf16", "--overwrite"]) == 0
    assert pt.read_bytes() != before
    mine = tmp_path / "mine.yaml"
    mine.write_text("mine\n")
    assert main(["from-hf", "--hf-dir", str(path), "--out", str(tmp_path / "new.pt"), "--config-out", str(mine)]) == 2
    assert f"--config-out {mine} exists" in capsys.readouterr().err and mine.read_text() == "mine\n"
    # --config-out naming --out itself (or a file inside a dist --out): the YAML replaced the converted model, exit 0.
    same = tmp_path / "same.pt"
    assert main(["from-hf", "--hf-dir", str(path), "--out", str(same), "--config-out", str(same)]) == 2
    assert f"--config-out {same} is --out or inside it" in capsys.readouterr().err and not same.exists()
    inside = tmp_path / "dist-out"
    assert main(["from-hf", "--hf-dir", str(path), "--out", str(inside), "--format", "dist",
                 "--config-out", str(inside / "effdist_model.json")]) == 2
    assert "is --out or inside it" in capsys.readouterr().err and not inside.exists()

    hf = tmp_path / "exported"
    assert main(["to-hf", "--checkpoint", str(pt), "--out", str(hf)]) == 0
    assert oct((hf / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert main(["to-hf", "--checkpoint", str(pt), "--out", str(hf)]) == 2
    assert f"--out {hf} is not empty (config.json, model.safetensors)" in capsys.readouterr().err
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert main(["to-hf", "--checkpoint", str(pt), "--out", str(hf), "--overwrite"]) == 2
    assert "holds other weight files (model-00001-of-00002.safetensors)" in capsys.readouterr().err
    (hf / "model-00001-of-00002.safetensors").unlink()
    assert main(["to-hf", "--checkpoint", str(pt), "--out", str(hf), "--overwrite"]) == 0
    assert main(["to-hf", "--checkpoint", str(pt), "--out", str(hf / "config.json")]) == 2
    assert "is a file; this conversion writes a directory" in capsys.readouterr().err
    assert main(["from-hf", "--hf-dir", str(path), "--out", "/proc/effdist/model.pt"]) == 1
    assert capsys.readouterr().err.startswith("effdist convert: cannot write /proc/effdist")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["from-hf", "--hf-dir", str(broken), "--out", str(tmp_path / "b.pt")]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unsupported_checkpoints_are_named(tmp_path):
    _, path = make_hf_model(tmp_path)
    hf_config, hf_sd = load_hf_checkpoint(path)
    with pytest.raises(ConversionError, match="rope"):
        config_from_hf(dict(hf_config, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(ConversionError, match="hidden_act"):
        config_from_hf(dict(hf_config, hidden_act="gelu"))
    cfg = config_from_hf(hf_config)
    missing = dict(hf_sd)
    del missing["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match="up_proj"):
        hf_to_effdist(missing, cfg)
    wrong = dict(hf_sd, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(ConversionError, match=r"model.norm.weight: expected \[64\], the HF checkpoint has \[65\]"):
        hf_to_effdist(wrong, cfg)
    assert main(["hf-to-effdist", "--hf-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")]) == 2
    # A file that is no effdist model (a run's config.yaml given as --checkpoint): one line, exit 2.
    (tmp_path / "config.yaml").write_text("model:\n  num_layers: 2\n")
    assert main(["to-hf", "--checkpoint", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "hf-out")]) == 2
    assert not (tmp_path / "hf-out").exists()


def test_exporting_a_sparse_ffn_model_gives_a_fix_that_works():
    """to-hf of a model whose FFN is not SwiGLU: the refusal's advice is one that can work. MoC keeps SwiGLU's
    weights (export with a swiglu config); ELAS, top-k and ReLU² have other shapes (no HF equivalent), where
    "convert with a swiglu config" only led to a shape error saying "leave out --config"."""
    from effdist.config import load_config
    from tests.launching import TINY

    with pytest.raises(ConversionError, match="weights are SwiGLU's, so --config .* ffn.kind: swiglu exports them"):
        effdist_to_hf({}, load_config(TINY, ["ffn.kind=moc"]))
    for kind in ("elas", "topk", "relu2"):
        with pytest.raises(ConversionError, match="other shapes, so the model has no transformers equivalent"):
            effdist_to_hf({}, load_config(TINY, [f"ffn.kind={kind}"]))


def _altered_hf_dir(tmp_path, name, src, tensors=None, drop=(), **config_changes):
    """A copy of the HF directory `src` with some tensors replaced, added or dropped, or config.json changed."""
    import json

    from safetensors.torch import save_file

    hf_config, sd = load_hf_checkpoint(src)
    sd = {k: v for k, v in sd.items() if k not in drop}
    sd.update(tensors or {})
    out = tmp_path / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dict(hf_config, **config_changes)))
    save_file(sd, str(out / "model.safetensors"))
    return out


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


def test_every_misfit_tensor_is_named_with_its_shapes_and_the_fix(tmp_path, capsys):
    _, path = make_hf_model(tmp_path)
    out = str(tmp_path / "x.pt")
    # Wrong shape, missing key and a tensor the layout does not have: all three in one message, one line each.
    bad = _altered_hf_dir(tmp_path, "bad", path, drop=["model.layers.2.mlp.up_proj.weight"], tensors={
        "model.layers.1.mlp.down_proj.weight": torch.zeros(64, 90),
        "model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    vocab = _altered_hf_dir(tmp_path, "vocab", path, vocab_size=120)
    capsys.readouterr()  # transformers' own save bar
    assert main(["hf-to-effdist", "--hf-dir", str(bad), "--out", out]) == 2
    lines = _error_lines(capsys)
    assert lines[0] == "effdist convert: the HF checkpoint does not fit its config.json (3 problem(s)):"
    assert lines[1:4] == [
        "  model.layers.1.mlp.down_proj.weight: expected [64, 96], the HF checkpoint has [64, 90]",
        "  model.layers.2.mlp.up_proj.weight: missing from the HF checkpoint (expected [96, 64])",
        "  model.layers.0.self_attn.q_norm.weight: in the HF checkpoint ([16]) but not in this model"]
    assert lines[4].startswith("  fix: ") and len(lines) == 5
    # Wrong vocabulary: config.json says 120 tokens, the embedding and LM head have 100 rows.
    assert main(["from-hf", "--hf-dir", str(vocab), "--out", out]) == 2
    lines = _error_lines(capsys)
    assert lines[1] == "  vocabulary: model.embed_tokens.weight has 100 rows, config.json says vocab_size = 120"
    assert "  model.embed_tokens.weight: expected [120, 64], the HF checkpoint has [100, 64]" in lines
    assert "  lm_head.weight: expected [120, 64], the HF checkpoint has [100, 64]" in lines
    assert not (tmp_path / "x.pt").exists()


def test_effdist_to_hf_with_a_config_of_another_shape_is_named(tmp_path, capsys):
    _, path = make_hf_model(tmp_path)
    capsys.readouterr()  # transformers' own save bar
    dist_dir, torch_file = tmp_path / "dist", tmp_path / "model.pt"
    assert main(["from-hf", "--hf-dir", str(path), "--out", str(dist_dir), "--format", "dist"]) == 0
    assert main(["from-hf", "--hf-dir", str(path), "--out", str(torch_file)]) == 0
    out = capsys.readouterr().out
    assert f"effdist train --config {dist_dir / 'config.yaml'} --set checkpoint.init_from={dist_dir}" in out
    other = tmp_path / "other.yaml"  # 4 layers, ffn 176, vocab 512: the tiny-cpu shape, not the HF model's
    other.write_text("model: {num_layers: 4, hidden_size: 64, num_attention_heads: 4, num_query_groups: 2, "
                     "ffn_hidden_size: 176, vocab_size: 512}\n")
    assert main(["to-hf", "--checkpoint", str(dist_dir), "--config", str(other), "--out", str(tmp_path / "b")]) == 2
    lines = _error_lines(capsys)
    assert lines[0].startswith(f"effdist convert: checkpoint {dist_dir} does not fit the config (9 problem(s))")
    assert "  vocabulary: 100 tokens in the checkpoint, 512 in this model (model.vocab_size)" in lines
    assert ("  model.decoder.layers.mlp.linear_fc1.weight: expected [4, 352, 64], the checkpoint has [3, 192, 64]"
            in lines)
    assert lines[-1] == "  fix: leave out --config (the checkpoint carries its own)"
    assert main(["to-hf", "--checkpoint", str(torch_file), "--config", str(other), "--out", str(tmp_path / "b")]) == 2
    lines = _error_lines(capsys)
    assert ("  vocabulary: embedding.word_embeddings.weight has 128 rows, the config has vocab_size = 512, "
            "padded to 512") in lines
    assert "  decoder.layers.0.mlp.linear_fc1.weight: expected [352, 64], the effdist checkpoint has [192, 64]" in lines
    assert lines[0].endswith("(15 problem(s)):") and lines[-2] == "  ... and 3 more"  # 12 listed, the rest counted
    assert not (tmp_path / "b").exists()
    # A path that holds no checkpoint: named, exit 2.
    (tmp_path / "empty_run").mkdir()
    assert main(["to-hf", "--checkpoint", str(tmp_path / "empty_run"), "--out", str(tmp_path / "b")]) == 2
    assert "holds no complete effdist checkpoint" in _error_lines(capsys)[0]


def test_resuming_from_a_converted_model_points_to_init_from(tmp_path):
    from effdist.model.hf_convert import CONVERTED_MARKER
    from effdist.train.checkpoint import CheckpointError
    from effdist.train.trainer import Trainer

    converted = tmp_path / "tinyllama"
    converted.mkdir()
    (converted / CONVERTED_MARKER).write_text("{}")
    trainer = Trainer.__new__(Trainer)  # only the --resume path check runs, before anything is loaded
    trainer.resume, trainer.runtime = str(converted), None
    with pytest.raises(CheckpointError, match=f"it is a converted model: start a run from it with --set "
                                              f"checkpoint.init_from={converted}"):
        trainer._maybe_resume()
