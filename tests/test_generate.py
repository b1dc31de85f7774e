"""Generation with a KV cache and a chosen EPAS region (effdist.infer).

* the inference forward computes megatron GPTModel's logits (fp32), dense and with sharing regions;
* greedy generation with the cache equals recomputing the whole sequence at every step, for region
  0, a middle region and the full region, with left-padded batches;
* decode that reuses the anchor's attention probabilities equals recomputing the attention (SDPA)
  in every sharing layer; a step over a bucket of slots (as a CUDA graph runs it) equals one over
  exactly the filled slots;
* sharing layers store no K; bad inputs get clear messages;
* end to end: `effdist train` with TP=2 on two processes, then `effdist generate` on its checkpoint;
* tools/bench_decode.py --tiny.
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from effdist.infer.cache import KVCache, SharingPlan, kv_cache_bytes
from effdist.infer.generate import (
    Generation,
    GenerationError,
    GenerationWarning,
    Generator,
    RegionWarning,
    main,
    read_checkpoint_info,
)
from effdist.infer.graphs import DecodeRunner
from effdist.infer.model import InferenceModel, ModelShape
from tests.launching import ROOT, run_train

# 4 layers, GQA (4 query heads over 2 K/V heads), a vocabulary padded past its real size.
SHAPE = ModelShape(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=200,
                   padded_vocab_size=256, max_positions=64)
FFN = 96


def random_model(seed: int = 0) -> InferenceModel:
    # Weights larger than training's init, so that logits are far apart and greedy choices are
    # decided by the model, not by rounding.
    model = InferenceModel.random(SHAPE, FFN, seed=seed, std=0.25)
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.layers:  # norms that tell the layers apart
        layer.input_norm.uniform_(0.5, 1.5, generator=gen)
        layer.mlp_norm.uniform_(0.5, 1.5, generator=gen)
    return model


PROMPTS = [[5, 17, 3, 99, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [150]]  # different lengths: left padding


# ---------------------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("region,ffn_kind,tie", [(0, "swiglu", False), (2, "swiglu", False), (3, "relu2", True)])
def test_inference_logits_equal_megatron_gptmodel(region, ffn_kind, tie):
    from effdist.config import Config
    from effdist.epas import set_region
    from effdist.model.gpt import build_gpt
    from effdist.runtime.distributed import one_process_megatron

    cfg = Config()
    cfg.epas.enabled, cfg.epas.final_region = True, 3
    cfg.model.init_std, cfg.model.tie_embeddings, cfg.ffn.kind = 0.1, tie, ffn_kind
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with one_process_megatron():
        torch.manual_seed(0)
        gpt = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32,
                        torch.device("cpu")).eval()
        with torch.no_grad():
            for name, p in gpt.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        model = InferenceModel.from_state_dict(gpt.state_dict(), cfg)
        positions = torch.arange(24).expand(2, 24)
        with torch.no_grad():
            set_region([gpt], region)
            expected = gpt(tokens, positions, None)
            set_region([gpt], 0)
            dense = gpt(tokens, positions, None)
    got = model(tokens, SharingPlan.for_region(4, region))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if region:  # sharing changes the function, so the comparison above could fail
        assert (got - dense).abs().max() > 1e-3


@pytest.mark.parametrize("region", [0, 2, 3])
def test_cached_greedy_equals_recomputing_the_sequence(region):
    gen = Generator(random_model(), trained_region=3)
    cached = gen.generate(PROMPTS, max_new_tokens=14, epas_region=region)
    recomputed = gen.generate(PROMPTS, max_new_tokens=14, epas_region=region, use_cache=False)
    assert cached.tokens == recomputed.tokens
    assert [len(t) for t in cached.tokens] == [14, 14, 14] and cached.finish_reasons == ["length"] * 3
    assert cached.region == region and cached.sharing_layers == list(range(4 - region, 4))
    # A prompt decodes the same alone as in a padded batch.
    alone = gen.generate(PROMPTS[2], max_new_tokens=14, epas_region=region)  # one prompt, as a list of ids
    assert alone.tokens == [cached.tokens[2]]
    as_tensor = gen.generate(torch.tensor(PROMPTS[1])[None], max_new_tokens=14, epas_region=region)
    assert as_tensor.tokens == [cached.tokens[1]]
    if region == 3:  # the region matters: the comparison can fail
        assert gen.generate(PROMPTS, max_new_tokens=14, epas_region=0).tokens != cached.tokens


def test_shallow_to_deep_region_cached_equals_recomputed():
    """The ablation direction: layers 1..n share, all with layer 0 as their anchor."""
    gen = Generator(random_model(), trained_region=2, direction="shallow_to_deep")
    cached = gen.generate(PROMPTS, max_new_tokens=10, epas_region=2)
    assert cached.sharing_layers == [1, 2]
    assert cached.tokens == gen.generate(PROMPTS, max_new_tokens=10, epas_region=2, use_cache=False).tokens


def _prefilled(model: InferenceModel, plan: SharingPlan) -> KVCache:
    cache = KVCache(plan, 3, 40, SHAPE.num_kv_heads, SHAPE.head_dim, torch.float32, "cpu")
    tokens = torch.randint(0, SHAPE.vocab_size, (3, 10), generator=torch.Generator().manual_seed(5))
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[0, :4] = False
    valid[2, :7] = False
    model.prefill(tokens, plan, cache, valid)
    return cache


@pytest.mark.parametrize("region", [2, 3])
def test_reused_probabilities_equal_recomputed_attention(region):
    model, plan = random_model(), SharingPlan.for_region(4, region)
    cache = _prefilled(model, plan)
    steps = torch.randint(0, SHAPE.vocab_size, (6, 3), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for tokens in steps:
            cache.tokens.copy_(tokens)
            reused = model.decode_step(cache, plan, reuse_attention=True)
            recomputed = model.decode_step(cache, plan, reuse_attention=False)  # SDPA in every sharing layer
            torch.testing.assert_close(reused, recomputed, rtol=1e-5, atol=1e-5)
            cache.advance()


def test_bucketed_decode_step_equals_exact_length():
    """A CUDA graph attends over a fixed bucket of slots, the unwritten ones masked: same logits."""
    model, plan = random_model(), SharingPlan.for_region(4, 2)
    exact, bucketed = _prefilled(model, plan), _prefilled(model, plan)
    for tokens in torch.randint(0, SHAPE.vocab_size, (5, 3), generator=torch.Generator().manual_seed(7)):
        exact.tokens.copy_(tokens)
        bucketed.tokens.copy_(tokens)
        with torch.no_grad():
            want = model.decode_step(exact, plan)
            got = model.decode_step(bucketed, plan, attend_len=32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        exact.advance()
        bucketed.advance()


def test_decode_runner_captures_one_step_per_bucket(monkeypatch):
    """The runner's graph bookkeeping, on the CPU: a stand-in 'graph' whose replay reruns the captured
    step into its fixed output tensor, as a CUDA graph replay does."""
    model, plan = random_model(), SharingPlan.for_region(4, 3)
    captured = []

    class ReplayedStep:
        def __init__(self, runner, length):
            self.run = lambda: model.decode_step(runner.cache, plan, length)
            self.output = self.run()

        def replay(self):
            self.output.copy_(self.run())

    def capture(runner, length):
        captured.append(length)
        step = ReplayedStep(runner, length)
        return step, step.output

    monkeypatch.setattr(DecodeRunner, "_capture", capture)
    exact = DecodeRunner(model, _prefilled(model, plan), cuda_graphs=False)
    graphed = DecodeRunner(model, _prefilled(model, plan), cuda_graphs=False, bucket=8)
    graphed.cuda_graphs = True  # what a CUDA cache gets; the stand-in needs no GPU
    for tokens in torch.randint(0, SHAPE.vocab_size, (12, 3), generator=torch.Generator().manual_seed(8)):
        for runner in (exact, graphed):
            runner.cache.tokens.copy_(tokens)
        with torch.no_grad():
            want, got = exact.step().clone(), graphed.step()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        exact.cache.advance()
        graphed.cache.advance()
    # 10 prompt slots + 12 steps: slots 11..22 are attended as buckets of 16 and 24
    assert captured == [16, 24] and graphed.captured_lengths == [16, 24]


def test_sharing_layers_store_no_keys():
    plan = SharingPlan.for_region(4, 2)
    cache = KVCache(plan, 2, 100, 2, 16, torch.float32, "cpu")
    assert cache.max_len == 128  # rounded up to aligned rows
    assert [k is None for k in cache.keys] == [False, False, True, True]
    one_tensor = 2 * 2 * 128 * 16 * 4
    assert cache.nbytes == (2 + 4) * one_tensor == cache.bytes_for(128)
    assert plan.anchor_of(3) == 1 and plan.has_sharers(1) and not plan.has_sharers(0)
    out = Generator(random_model(), trained_region=3).generate(PROMPTS, max_new_tokens=4, epas_region=2)
    slots = 9 + 4
    assert out.kv_cache_bytes == kv_cache_bytes(plan, 3, slots, 2, 16, torch.float32) == 6 * 3 * 2 * slots * 16 * 4
    assert out.kv_cache_bytes / out.dense_kv_cache_bytes == pytest.approx(6 / 8)


def test_sampling_is_reproducible_and_respects_top_k():
    gen = Generator(random_model(), trained_region=3)
    a = gen.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_k=5, top_p=0.9, seed=11)
    b = gen.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_k=5, top_p=0.9, seed=11)
    assert a.tokens == b.tokens
    assert a.tokens != gen.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=12).tokens
    # top_k = 1 is greedy
    assert gen.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_k=1, seed=1).tokens == \
        gen.generate(PROMPTS, max_new_tokens=6).tokens


# ---------------------------------------------------------------------------------------- bad inputs

def test_region_beyond_training_warns_and_beyond_layers_fails():
    gen = Generator(random_model(), trained_region=1)
    with pytest.warns(RegionWarning, match="trained with: layer 2 never learned"):
        out = gen.generate(PROMPTS, max_new_tokens=2, epas_region=2)
    assert out.region == 2
    with pytest.raises(GenerationError, match="4 layers, so at most 3 can share"):
        gen.generate(PROMPTS, max_new_tokens=2, epas_region=4)
    with pytest.raises(GenerationError, match="whole number"):
        gen.generate(PROMPTS, max_new_tokens=2, epas_region=-1)


def test_prompt_length_and_token_checks():
    gen = Generator(random_model(), trained_region=3)
    with pytest.raises(GenerationError, match="64 tokens; the model's max_position_embeddings is 64"):
        gen.generate([list(range(64))], max_new_tokens=1)
    with pytest.warns(GenerationWarning, match="generating at most 4"):
        out = gen.generate([list(range(60))], max_new_tokens=10)
    assert len(out.tokens[0]) == 4
    with pytest.raises(GenerationError, match="outside the vocabulary 0..199"):
        gen.generate([[1, 250]])
    with pytest.raises(GenerationError, match="no tokenizer.*--tokenizer"):
        gen.generate(["some text"])
    with pytest.raises(GenerationError, match="top_p = 0"):
        gen.generate(PROMPTS, temperature=1.0, top_p=0)
    for bad in (float("nan"), float("inf")):  # not a traceback from torch.multinomial
        with pytest.raises(GenerationError, match=f"temperature = {bad}: must be a finite number >= 0"):
            gen.generate(PROMPTS, temperature=bad)


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(GenerationError, match="does not exist"):
        read_checkpoint_info(tmp_path / "missing")
    with pytest.raises(GenerationError, match="holds no complete effdist checkpoint"):
        read_checkpoint_info(tmp_path)
    assert main(["--checkpoint", str(tmp_path), "--prompt-ids", "1,2"]) == 2
    # A file that is no model (a run's metrics.jsonl): one line naming it, not an unpickling traceback.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(GenerationError, match="metrics.jsonl is not an effdist model file.*torch cannot read it"):
        read_checkpoint_info(tmp_path / "metrics.jsonl")
    assert main(["--checkpoint", str(tmp_path / "metrics.jsonl"), "--prompt-ids", "1,2"]) == 2


def test_a_relative_checkpoint_dir_is_found_where_the_trainer_put_it(tmp_path, monkeypatch):
    """checkpoint.dir=ck (relative) saved into WORKDIR/ck, the working directory of `effdist train`: --checkpoint
    RUN_DIR from there finds it (it looked only under RUN_DIR/ck)."""
    from pathlib import Path

    from effdist.train.checkpoint import MARKER, resolve

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("checkpoint:\n  dir: ck\n")
    (tmp_path / "ck" / "iter_0000002").mkdir(parents=True)
    (tmp_path / "ck" / "iter_0000002" / MARKER).write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve("run") == Path("ck") / "iter_0000002"


# ---------------------------------------------------------------------------------------- end to end

# Two training processes: marked slow like the other multi-process tests (~15 s on 2 cores).
@pytest.fixture(scope="module", autouse=True)
def training(tmp_path_factory):
    """A tiny EPAS model trained with TP=2 on two processes (the region reaches 2 of 4 layers), started with this
    module's first test so that it trains beside the in-process tests: (run directory, future)."""
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    with ThreadPoolExecutor(1) as pool:
        yield run_dir, pool.submit(
            run_train, run_dir, ["train.steps=3", "epas.enabled=true", "epas.interval=1", "epas.final_region=2",
                                 "data.sample_documents=200", "data.seq_length=64", "train.global_batch=4",
                                 "logging.tensorboard=false", "logging.progress_bar=false", "parallel.tp=2"],
            nproc=2, resume="none")


@pytest.fixture(scope="module")
def trained_run(training):
    """The finished run of `training`."""
    run_dir, future = training
    future.result()
    return run_dir


@pytest.mark.slow
def test_generate_cli_on_a_tp2_training_checkpoint(trained_run, capsys):
    rc = main(["--checkpoint", str(trained_run), "--prompt", "The cat", "--prompt", "A", "--max-new-tokens", "6",
               "--temperature", "0", "--ignore-eod", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert out["checkpoint"].endswith("iter_0000003")
    assert out["trained_region"] == 2 and out["region"] == 2 and out["sharing_layers"] == [2, 3]
    assert [len(t) for t in out["tokens"]] == [6, 6] and all(isinstance(t, str) for t in out["texts"])
    assert out["kv_cache_bytes"] / out["dense_kv_cache_bytes"] == pytest.approx(0.75)
    assert "KV cache" in captured.err and "warning" not in captured.err

    rc = main(["--checkpoint", str(trained_run / "checkpoints"), "--prompt", "The cat", "--max-new-tokens", "3",
               "--epas-region", "3"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.startswith("[0] The cat")
    assert "warning: epas region = 3 is longer than the 2 sharing layers" in captured.err
    rc = main(["--checkpoint", str(trained_run), "--prompt", "x", "--epas-region", "4"])
    assert rc == 2 and "at most 3 can share" in capsys.readouterr().err

    # --tokenizer: the run's own is taken quietly; another one (here a word-level one) is said to be another.
    (own,) = [p for p in trained_run.rglob("tokenizer.json") if "previous" not in p.parts]
    rc = main(["--checkpoint", str(trained_run), "--prompt", "The cat", "--max-new-tokens", "2", "--tokenizer", str(own)])
    assert rc == 0 and "warning" not in capsys.readouterr().err
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(100)} | {"<|endoftext|>": 100}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(trained_run.parent / "other.json"))
    rc = main(["--checkpoint", str(trained_run), "--prompt", "w1 w2", "--max-new-tokens", "2", "--tokenizer",
               str(trained_run.parent / "other.json")])
    err = capsys.readouterr().err
    assert rc == 0 and "other.json is not the tokenizer the training data" in err, err


@pytest.mark.slow
def test_trained_checkpoint_cached_equals_recomputed(trained_run):
    gen = Generator.from_checkpoint(trained_run / "checkpoints" / "iter_0000003", device="cpu")
    assert gen.trained_region == 2 and gen.default_region == 2 and gen.tokenizer is not None
    for region in (0, 1, 2):
        cached = gen.generate(["The cat", "Once upon a"], max_new_tokens=8, epas_region=region, stop_at_eod=False)
        recomputed = gen.generate(["The cat", "Once upon a"], max_new_tokens=8, epas_region=region,
                                  stop_at_eod=False, use_cache=False)
        assert isinstance(cached, Generation) and cached.tokens == recomputed.tokens


@pytest.mark.slow
def test_a_run_with_its_checkpoints_elsewhere_finds_its_tokenizer(trained_run, tmp_path, capsys):
    """checkpoint.dir outside the run directory: `--checkpoint RUN_DIR` finds the checkpoint there (config.yaml)
    and the tokenizer in the run directory it was given, not only beside a checkpoints/ directory."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.move(str(run / "checkpoints"), str(tmp_path / "elsewhere"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["checkpoint"]["dir"] = str(tmp_path / "elsewhere")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rc = main(["--checkpoint", str(run), "--prompt", "The cat", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.startswith("[0] The cat"), captured.err


@pytest.mark.slow
def test_a_checkpoint_deleted_by_a_training_run_while_read_is_not_a_traceback(trained_run, tmp_path, monkeypatch,
                                                                               capsys):
    """`effdist generate --checkpoint RUN_DIR` beside the run training there: the trainer saved a newer checkpoint
    and its checkpoint.keep_last removed the one being read, and megatron's load ended in a traceback
    (`CheckpointingException: Checkpoint directory ... does not exist`). The run's newest is read instead; a
    checkpoint named by its own path is one line."""
    from effdist.infer import generate as gen_module

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpts = run / "checkpoints"
    original = gen_module.load_weights
    calls = []

    def retention_strikes(info):  # the first read loses its checkpoint to the next save's retention
        calls.append(info.path.name)
        if len(calls) == 1:
            if info.path.name == "iter_0000003":
                shutil.copytree(info.path, ckpts / "iter_0000004")
                (ckpts / "latest").write_text("iter_0000004\n")
            shutil.rmtree(info.path)
        return original(info)

    monkeypatch.setattr(gen_module, "load_weights", retention_strikes)
    rc = main(["--checkpoint", str(run), "--prompt", "The cat", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.startswith("[0] The cat"), captured.err
    assert calls == ["iter_0000003", "iter_0000004"] and "iter_0000004" in captured.err

    calls.clear()
    named = ckpts / "iter_0000004"
    rc = main(["--checkpoint", str(named), "--prompt", "The cat", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"checkpoint {named} was deleted while it was read" in err, err


@pytest.mark.slow
def test_checkpoint_without_its_tokenizer(trained_run, tmp_path, capsys):
    moved = tmp_path / "iter_0000003"
    shutil.copytree(trained_run / "checkpoints" / "iter_0000003", moved)  # away from the run's data/
    rc = main(["--checkpoint", str(moved), "--prompt", "The cat"])
    err = capsys.readouterr().err
    assert rc == 2 and "no tokenizer was found" in err and "--tokenizer" in err
    rc = main(["--checkpoint", str(moved), "--prompt-ids", "10,20,30", "--max-new-tokens", "4", "--ignore-eod"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.startswith("[0] [10, 20, 30] -> [")
    # Empty ids: one line saying what to give (an empty --prompt '' starts a new document; ids name no EOD).
    rc = main(["--checkpoint", str(moved), "--prompt-ids", ""])
    assert rc == 2 and "prompt 0 has no tokens: give at least one token id" in capsys.readouterr().err
    # A tokenizer of more entries than the model's vocabulary (another run's) is refused, not used.
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(1000)} | {"<|endoftext|>": 1000}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "big.json"))
    rc = main(["--checkpoint", str(moved), "--prompt", "w1 w2", "--tokenizer", str(tmp_path / "big.json")])
    assert rc == 2 and "has 1001 entries but the model was trained with model.vocab_size" in capsys.readouterr().err
    # A device this torch cannot use: one line.
    rc = main(["--checkpoint", str(moved), "--prompt-ids", "1,2", "--device", "tpu"])
    assert rc == 2 and "--device 'tpu': expected cpu or cuda[:N]" in capsys.readouterr().err
    if not torch.cuda.is_available():
        rc = main(["--checkpoint", str(moved), "--prompt-ids", "1,2", "--device", "cuda"])
        assert rc == 2 and "this torch sees no CUDA GPU; use --device cpu" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- benchmark

def test_bench_decode_tiny(tmp_path, monkeypatch, capsys):
    out = tmp_path / "decode.json"
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--tiny", "--batches", "2", "--contexts", "12",
                                      "--new-tokens", "4", "--json", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "tools" / "bench_decode.py"), run_name="__main__")
    assert done.value.code == 0
    assert "decode eager tok/s" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["results"]}
    assert set(rows) == {"0", "2", "3", "0-sdpa", "2-sdpa", "3-sdpa"}
    # K for the anchors, V for every layer: (4 + anchors) / 8 of the dense cache.
    assert [rows[v]["kv_cache_vs_region0"] for v in ("0", "2", "3")] == [1.0, 0.75, 0.625]
    assert rows["3"]["kv_cache_bytes"] == 5 * 2 * 2 * 16 * 16 * 4
    assert rows["3"]["ideal_decode_vs_region0"] > rows["2"]["ideal_decode_vs_region0"] > 1.0
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_eager_tokens_per_s"] > 0 for r in rows.values())


# ---------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager_on_gpu():
    model = random_model().cuda()
    gen = Generator(model, trained_region=3, cuda_graphs=True)
    eager = Generator(model, trained_region=3, cuda_graphs=False)
    for region in (0, 3):
        graphs = gen.generate(PROMPTS, max_new_tokens=20, epas_region=region)
        assert gen._runner.cuda_graphs and gen._runner.captured_lengths, "the decode step was not captured"
        assert graphs.tokens == eager.generate(PROMPTS, max_new_tokens=20, epas_region=region).tokens
        assert graphs.tokens == gen.generate(PROMPTS, max_new_tokens=20, epas_region=region, use_cache=False).tokens
    bf16 = Generator(random_model().cuda().to(torch.bfloat16), trained_region=3)
    a = bf16.generate(PROMPTS, max_new_tokens=8, epas_region=3)
    assert all(len(t) == 8 for t in a.tokens) and len(bf16._runner.captured_lengths) == 1
