"""The pipeline executor on real gloo processes: every schedule gives the pp=1 loss and gradients, tuples of
tensors cross boundaries with their gradients, measured activation memory follows the simulator, failures turn
into errors on every rank, the B/W-split linears are megatron's numerics, and recorded per-action timelines list
each rank's actions in order.

Each launch starts its ranks directly (RANK/WORLD_SIZE/MASTER_* in the environment) running this file as a
script (`_worker`); the ranks check in-process against a reference computed on every rank and rank 0 writes a
JSON report that the tests below read. One launch per world size keeps the suite fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("1f1b", "interleaved", "zb-h1", "v-min", "v-half", "v-zb")
MEMORY_SCHEDULES = ("1f1b", "v-half", "v-min", "v-zb")
TIMELINE_SCHEDULES = ("1f1b", "v-zb")

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------- launching

def launch(nproc: int, phase: str, tmp_path: Path, timeout: float = 240) -> tuple[dict, list[tuple[int, str]]]:
    """Run `phase` in `nproc` processes; returns (rank 0's report, [(exit code, stderr) per rank])."""
    from tests.launching import free_port  # here, not at the top: the workers run this file as a script

    report = tmp_path / f"{phase}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                    "TORCHELASTIC", "GROUP_RANK", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc), EFFDIST_TEST_REPORT=str(report),
               EFFDIST_TEST_DIR=str(tmp_path))
    procs = []
    for rank in range(nproc):
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), phase], cwd=ROOT,
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    outcomes = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"phase {phase} did not finish within {timeout} s (a hang)")
        outcomes.append((p.returncode, err))
    data = json.loads(report.read_text()) if report.is_file() else {}
    return data, outcomes


def _check_ok(outcomes) -> None:
    for rank, (code, err) in enumerate(outcomes):
        assert code == 0, f"rank {rank} exited with {code}:\n{err[-6000:]}"


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Every worker launch, two at a time: {phase: (rank 0's report, [(exit code, stderr) per rank], seconds)}.
    The failure phases mostly wait (on timeouts, on a dead peer), so they run beside the busy pp=4/pp=2 ones."""
    from tests.launching import in_parallel

    def timed(nproc: int, phase: str, timeout: float):
        t0 = time.monotonic()
        data, outcomes = launch(nproc, phase, tmp_path_factory.mktemp(phase), timeout=timeout)
        return data, outcomes, time.monotonic() - t0

    return in_parallel({"pp4": lambda: timed(4, "pp4", 240), "fail": lambda: timed(2, "fail", 120),
                        "pp2": lambda: timed(2, "pp2", 240), "dead": lambda: timed(2, "dead", 120)})


@pytest.fixture(scope="module")
def pp4(launches):
    data, outcomes, _ = launches["pp4"]
    _check_ok(outcomes)
    return data


@pytest.fixture(scope="module")
def pp2(launches):
    data, outcomes, _ = launches["pp2"]
    _check_ok(outcomes)
    return data


# ---------------------------------------------------------------------------------------------- tests

def _assert_matches(entry: dict, what: str) -> None:
    assert entry["params_covered"] == entry["params_reference"], (
        f"{what}: the chunks hold {entry['params_covered']} parameters, the pp=1 model {entry['params_reference']}")
    assert entry["loss"] == pytest.approx(entry["ref_loss"], rel=1e-6, abs=0), f"{what}: loss differs from pp=1"
    assert entry["grad_rel"] <= 1e-6, f"{what}: gradients differ from pp=1 (max relative difference {entry['grad_rel']:.2e})"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp4_step_matches_pp1(pp4, schedule):
    _assert_matches(pp4["correctness"][schedule], f"pp=4 {schedule}")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_step_matches_pp1(pp2, schedule):
    _assert_matches(pp2["correctness"][schedule], f"pp=2 {schedule}")


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "v-half"])
def test_uneven_layer_split_matches_pp1(pp2, schedule):
    entry = pp2["uneven"][schedule]
    _assert_matches(entry, f"5 layers, pp=2, {schedule}")
    assert "uneven split" in entry["layout"], entry["layout"]


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1", "v-zb"])
def test_tensor_tuple_crosses_boundaries_with_gradients(pp2, schedule):
    entry = pp2["extras"][schedule]
    assert entry["extras_sent"] > 0, "no extra tensor crossed a boundary"
    assert entry["loss"] == pytest.approx(entry["ref_loss"], rel=1e-6, abs=0)
    assert entry["grad_rel"] <= 1e-6, f"gradients through the extra tensors differ: {entry['grad_rel']:.2e}"
    assert entry["extra_grad_norm"] > 0, "the extra tensors received no gradient"


def test_epas_qk_crosses_pipeline_boundaries(pp2):
    for schedule, entry in pp2["epas"].items():
        assert entry["qk_boundaries"] >= 1, schedule
        assert entry["loss"] == pytest.approx(entry["ref_loss"], rel=1e-6, abs=0), schedule
        assert entry["grad_rel"] <= 1e-6, f"EPAS {schedule}: gradients differ from pp=1 ({entry['grad_rel']:.2e})"


@pytest.mark.parametrize("case", ["tp2", "tp2-sp"])
def test_split_linears_are_megatrons_numerics(pp2, case):
    entry = pp2["split_linears"][case]
    assert entry["loss_equal"], f"{case}: loss differs between split and megatron linears"
    assert entry["max_abs_diff"] == 0.0, f"{case}: gradients differ (max abs {entry['max_abs_diff']:.3e})"
    assert entry["deferred"] > 0, f"{case}: no weight gradient was deferred"


def test_forward_rows_defers_only_the_selected_rows(pp2):
    entry = pp2["split_linears"]["forward_rows"]
    assert entry["max_abs_diff"] == 0.0, entry
    assert entry["other_rows_zero"], "rows outside the selection received a gradient"


@pytest.mark.parametrize("schedule", TIMELINE_SCHEDULES)
def test_timeline_records_each_action_of_each_rank_in_order(pp2, schedule):
    entry = pp2["timeline"][schedule]
    assert entry["before_recording"].startswith("PipelineError") and "record_timeline" in entry["before_recording"]
    assert entry["loss_recorded"] == entry["loss_plain"], "recording the timeline changed the step's loss"
    records = entry["records"]
    for rank, expected in enumerate(entry["actions"]):
        row = [r for r in records if r["rank"] == rank]
        assert [f"{r['chunk']}{r['kind']}{r['microbatch']}" for r in row] == expected, f"rank {rank}"
        assert row[0]["start"] >= 0.0, f"rank {rank} starts before its step start"
        for r in row:
            assert r["end"] > r["start"], f"rank {rank}: {r} has no duration"
        for a, b in zip(row, row[1:]):
            assert b["start"] >= a["end"], f"rank {rank}: {b} starts before {a} ended"
    assert Path(entry["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_counts_a_wait_for_the_peer_as_idle(pp2):
    """Rank 0 sleeps 0.3 s inside its first F; rank 1's first action (the next chunk of that microbatch) must
    start after the sleep on the common clock, and its own span must not contain the wait."""
    records = pp2["timeline"]["delayed"]["records"]
    first0 = next(r for r in records if r["rank"] == 0)
    first1 = next(r for r in records if r["rank"] == 1)
    assert first0["end"] - first0["start"] >= 0.3
    assert first1["start"] >= 0.3 - 0.05, first1
    assert first1["end"] - first1["start"] < 0.25, f"rank 1's first action includes the wait: {first1}"


def test_checkpoint_keys_are_global(pp4):
    for placement, entry in pp4["keys"].items():
        assert entry["missing"] == [] and entry["extra"] == [], f"{placement}: {entry}"
        assert entry["count"] > 0


@pytest.mark.parametrize("schedule", MEMORY_SCHEDULES)
@pytest.mark.parametrize("microbatches", [8, 16])
def test_measured_peak_activation_matches_simulator(pp4, schedule, microbatches):
    entry = pp4["memory"][f"{schedule}/m{microbatches}"]
    for rank, (measured, predicted) in enumerate(zip(entry["measured"], entry["predicted"])):
        assert measured == pytest.approx(predicted, rel=0.05), (
            f"{schedule} m={microbatches} rank {rank}: measured {measured:.3f} units, simulator {predicted:.3f} "
            f"(b_frees {entry['b_frees']})")


def test_signature_mismatch_and_silent_peer_fail_fast(launches):
    """Ranks that disagree about a boundary (or about recording a timeline) all raise; a tensor of the wrong shape
    raises on its producer, and the peer waiting for it gets an error after parallel.timeout_s instead of hanging."""
    _, outcomes, seconds = launches["fail"]
    _check_ok(outcomes)
    for rank, (_, err) in enumerate(outcomes):
        assert "SIGNATURE-ERROR" in err and "disagree about what crosses" in err, f"rank {rank}:\n{err[-3000:]}"
        assert "RECORDING-ERROR" in err and "record_timeline=True" in err, f"rank {rank}:\n{err[-3000:]}"
    assert "SHAPE-ERROR" in outcomes[0][1] and "boundary signature is" in outcomes[0][1], outcomes[0][1][-3000:]
    assert "PEER-ERROR" in outcomes[1][1], outcomes[1][1][-3000:]
    assert "parallel.timeout_s" in outcomes[1][1]
    assert seconds < 90


def test_dead_peer_gives_an_error_not_a_hang(launches):
    _, outcomes, seconds = launches["dead"]
    assert outcomes[1][0] == 3, "rank 1 was meant to die with exit code 3"
    code, err = outcomes[0]
    assert code == 0, err[-3000:]
    assert "PEER-ERROR" in err and "pipeline rank 0" in err and "died" in err, err[-3000:]
    assert seconds < 90


def test_a_transfer_that_fails_to_post_names_the_peer_and_why(monkeypatch):
    """The dead peer can also show when a rank posts its next transfers (gloo: "Connection closed by peer") rather
    than while it waits: the same explanation either way (a CI run once hit this path)."""
    import torch
    import torch.distributed as dist

    from effdist.pipeline import p2p
    from effdist.pipeline.schedules import build_schedule
    from effdist.protocols import TensorSpec

    class Op:  # dist.P2POp without a process group
        def __init__(self, op, tensor, peer, group=None, tag=0):
            self.peer = peer

    def closed(ops):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:62649")

    monkeypatch.setattr(dist, "P2POp", Op)
    monkeypatch.setattr(dist, "batch_isend_irecv", closed)
    schedule = build_schedule("zb-h1", 2, 4)
    spec = (TensorSpec((4, 1, 8), torch.float32),)
    transfers = p2p.StepTransfers(p2p.CommPlan.build(schedule, 1), [spec], group=None, global_ranks=[5, 9],
                                  device=torch.device("cpu"), timeout_s=5)
    with pytest.raises(p2p.PipelineCommError) as err:
        transfers.advance()  # rank 1 starts by posting its receives from rank 0 (global rank 5)
    message = str(err.value)
    assert message.startswith("pipeline rank 1: posting") and "with global rank(s) 5" in message, message
    assert "Connection closed by peer" in message and "The peer process probably died" in message, message


# ---------------------------------------------------------------------------------------------- trainer

TRAIN = ["model.num_layers=4", "train.steps=3", "train.global_batch=8", "train.micro_batch=2", "data.seq_length=64",
         "logging.tensorboard=false", "logging.progress_bar=false", "optim.warmup_steps=1",
         # checkpoint.py names multi-chunk state dicts per local chunk index, which differs between layouts (see
         # docs/pipeline_executor.md); the step-level tests cover checkpoint keys.
         "checkpoint.save_at_end=false"]


@pytest.fixture(scope="module")
def trainer_launches(tmp_path_factory):
    """The trainer runs (pp=1, and pp=2 with each schedule of test_trainer_pp2_matches_pp1) on one data cache and
    tools/bench_pipeline.py --tiny, two at a time: {name: run directory} and bench: (process, json, picture dir)."""
    from tests.launching import clean_env, in_parallel, run_train

    data = tmp_path_factory.mktemp("train-data")
    root = tmp_path_factory.mktemp("trainer")

    def train(name: str, extra: list[str], nproc: int):
        run_train(root / name, TRAIN + [f"data.cache_dir={data}", *extra], nproc=nproc, resume="none")
        return root / name

    def bench():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tools" / "bench_pipeline.py"), "--tiny", "--schedules", "1f1b,zb-h1,v-min", "--json",
               str(root / "bench.json"), "--timeline-dir", str(root / "timelines")]
        proc = subprocess.run(cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        return proc, root / "bench.json", root / "timelines"

    jobs = {"pp1": lambda: train("pp1", [], 1), "bench": bench}
    for schedule in ("1f1b", "v-zb"):
        # The memory probe is off by default (its hooks and all-gather cost step time) and on by a flag: one case each.
        probe = ["pipeline.measure_memory=true"] if schedule == "1f1b" else []
        jobs[schedule] = (lambda schedule=schedule, probe=probe: train(
            schedule, ["parallel.pp=2", f"pipeline.schedule={schedule}", *probe], 2))
    return in_parallel(jobs)


@pytest.mark.parametrize("schedule", ["1f1b", "v-zb"])
def test_trainer_pp2_matches_pp1(trainer_launches, schedule):
    from tests.launching import losses

    pp1_losses = losses(trainer_launches["pp1"])
    run = trainer_launches[schedule]
    probe = schedule == "1f1b"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted(pp1_losses)
    for r in records:
        assert r["loss"] == pytest.approx(pp1_losses[r["step"]], rel=2e-5), f"step {r['step']}"
        if probe:
            units = r["pipeline_peak_activation_units"]
            assert len(units) == 2 and all(u > 0 for u in units), r
            assert len(r["pipeline_peak_activation_bytes"]) == 2
        else:
            assert not any(k.startswith("pipeline_") for k in r), r


def test_bench_tiny_smoke(trainer_launches):
    proc, out, pictures = trainer_launches["bench"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    # Like for like: every schedule with effdist's fused kernels and with megatron-core's modules (on GPU
    # megatron-core's 1F1B runs with each set too; it is skipped on CPU).
    assert [(r["schedule"], r["kernels"]) for r in summary["results"]] == [
        (s, k) for k in ("fused", "unfused") for s in ("1f1b", "zb-h1", "v-min")]
    assert summary["kernels"] == ["fused", "unfused"] and summary["command"].startswith("tools/bench_pipeline.py")
    stem = {(r["schedule"], r["kernels"]): f"timeline_{r['schedule']}" + ("_unfused" if r["kernels"] == "unfused"
                                                                         else "") for r in summary["results"]}
    for r in summary["results"]:
        assert r["tokens_per_s"] > 0 and len(r["peak_mem_gib"]) == 2
        for measured, predicted in zip(r["activation_units"], r["simulated_units"]):
            assert measured == pytest.approx(predicted, rel=0.05), r
        assert len(r["measured_bubble_rates"]) == 2 and all(0 <= b < 1 for b in r["measured_bubble_rates"]), r
        name = stem[r["schedule"], r["kernels"]]
        assert (pictures / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        picture = json.loads((pictures / f"{name}.json").read_text())
        assert picture["measured"]["bubble_rates"] == r["measured_bubble_rates"]
        assert len(picture["measured"]["actions"]) == len(picture["simulated"]["actions"]) > 0
        # The simulation with each chunk's own measured costs (what the picture draws) beside the uniform one.
        chunks = r["fitted_chunk_costs_s"]
        assert len(chunks) == (4 if r["schedule"] == "v-min" else 2) and all(c["forward"] > 0 for c in chunks), r
        assert len(r["fitted_chunk_bubble_rates"]) == 2 and 0 <= r["fitted_chunk_bubble_rate"] < 1, r
        assert picture["simulated_per_chunk"]["chunk_costs_s"] == chunks
        assert len(picture["simulated_per_chunk"]["actions"]) == len(picture["measured"]["actions"])
    assert "tokens/s" in proc.stdout and "v-min" in proc.stdout


# ---------------------------------------------------------------------------------------------- worker

def _init(tp: int, pp: int, timeout_s: float = 120.0):
    import datetime

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from effdist.runtime import cpu_compat
    from effdist.runtime.distributed import Runtime, _seed_cpu_tracker

    cpu_compat.install()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    _seed_cpu_tracker(1234)
    return Runtime(device=torch.device("cpu"), backend="gloo", dtype=torch.float32, rank=dist.get_rank(),
                   world_size=dist.get_world_size(), local_rank=dist.get_rank(), tp=tp, pp=pp,
                   dp=parallel_state.get_data_parallel_world_size(),
                   tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                   pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                   dp_rank=parallel_state.get_data_parallel_rank())


def _cfg(layers: int, pp: int, schedule: str, microbatches: int, tp: int = 1, **epas):
    from effdist.config import Config

    cfg = Config()
    cfg.model.num_layers = layers
    cfg.parallel.pp, cfg.parallel.tp = pp, tp
    cfg.parallel.timeout_s = 60.0
    cfg.pipeline.schedule = schedule
    cfg.pipeline.microbatches = microbatches
    cfg.data.seq_length = 32
    cfg.train.micro_batch = 2
    cfg.train.dtype = "fp32"
    cfg.train.seed = 1234
    for k, v in epas.items():
        setattr(cfg.epas, k, v)
    return cfg


def _batches(cfg, m: int, seed: int = 7) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    s, b = cfg.data.seq_length, cfg.train.micro_batch
    out = []
    for _ in range(m):
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": (torch.rand(b, s, generator=g) > 0.1).float(),
                    "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous()})
    return out


def _tokens(mbs) -> float:
    return sum(float(mb["loss_mask"].sum()) for mb in mbs)


def _reference(cfg, mbs, region=None):
    """Loss and gradients of the pp=1 model (built exactly as a pp=1 run builds it) on the same microbatches."""
    import torch

    from effdist.model.gpt import build_gpt

    torch.manual_seed(cfg.train.seed)
    model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
    if region is not None:
        from effdist.model.shared_qk import apply_region

        apply_region([model], region)
    n = _tokens(mbs)
    total = 0.0
    for mb in mbs:
        per_token = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
        loss_sum = (per_token.float() * mb["loss_mask"]).sum()
        (loss_sum / n).backward()
        total += float(loss_sum)
    return total, {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _pipeline(cfg, rt, extras=None, region=None):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from effdist.pipeline.executor import build_pipeline

    torch.manual_seed(cfg.train.seed)
    pipe = build_pipeline(cfg, rt, measure_memory=True)
    if region is not None:
        from effdist.model.shared_qk import apply_region

        apply_region(pipe.model_chunks, region)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    wrapped = [DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
               for i, c in enumerate(pipe.model_chunks)]
    pipe.set_wrapped_chunks(wrapped)
    if extras is not None:
        pipe.set_boundary_extras(extras)
    return pipe, wrapped


def _step(pipe, wrapped, mbs) -> float:
    """One forward_backward; the loss summed over the pipeline (only the last chunk's rank holds it)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    for w in wrapped:
        w.zero_grad_buffer()
    loss = pipe.forward_backward(mbs, _tokens(mbs))
    for w in wrapped:
        w.finish_grad_sync()
    t = loss.detach().double().reshape(1)
    dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    return float(t.item())


def _compare(pipe, wrapped, reference: dict, key=None) -> dict:
    """Worst relative gradient difference over this pipeline's parameters (max over ranks), and how many of the
    reference's parameters the chunks of all ranks hold."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from effdist.pipeline.chunks import full_model_name

    worst, count = 0.0, 0
    for chunk, w in zip(pipe.chunk_ids, wrapped):
        for name, p in w.module.named_parameters():
            ref = reference[key(chunk, name) if key else full_model_name(pipe.layout, chunk, name)]
            scale = float(ref.abs().max()) or 1.0
            worst = max(worst, float((p.main_grad - ref).abs().max()) / scale)
            count += 1
    t = torch.tensor([worst, float(count)], dtype=torch.float64)
    group = parallel_state.get_pipeline_model_parallel_group()
    worst_t, count_t = t[:1].clone(), t[1:].clone()
    dist.all_reduce(worst_t, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(count_t, group=group)
    return {"grad_rel": float(worst_t), "params_covered": int(count_t), "params_reference": len(reference)}


def _correctness(rt, layers, pp, m, schedules) -> dict:
    out = {}
    mbs = _batches(_cfg(layers, pp, "1f1b", m), m)
    ref_loss, ref_grads = _reference(_cfg(layers, pp, "1f1b", m), mbs)
    for name in schedules:
        cfg = _cfg(layers, pp, name, m)
        pipe, wrapped = _pipeline(cfg, rt)
        loss = _step(pipe, wrapped, mbs)
        out[name] = dict(_compare(pipe, wrapped, ref_grads), loss=loss, ref_loss=ref_loss,
                         layout=pipe.layout.describe())
        pipe.close()
    return out


def _sharded_keys(modules) -> set:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    keys = set()
    for module in modules:
        for item in module.sharded_state_dict(prefix="model.").values():
            if isinstance(item, (ShardedTensor, ShardedObject)):
                keys.add((item.key, tuple(item.global_shape), tuple(item.global_offset)))
    return keys


def _phase_pp4(report: dict) -> None:
    import torch
    import torch.distributed as dist

    from effdist.model.gpt import build_gpt
    from effdist.pipeline.simulate import simulate

    rt = _init(1, 4)
    report["correctness"] = _correctness(rt, 8, 4, 8, SCHEDULES)

    report["keys"] = {}
    torch.manual_seed(1)
    single = _cfg(8, 1, "1f1b", 1)
    full_keys = _sharded_keys([build_gpt(single.model, single.parallel, single.train, single.ffn, single.epas,
                                         torch.float32, torch.device("cpu"))])
    for name in ("1f1b", "interleaved", "v-zb"):
        pipe, _ = _pipeline(_cfg(8, 4, name, 8), rt)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(_sharded_keys(pipe.model_chunks)))
        union = set(tuple(map(lambda x: tuple(x) if isinstance(x, list) else x, k)) for part in gathered for k in part)
        report["keys"][name] = {"count": len(union), "missing": sorted(map(str, full_keys - union))[:5],
                                "extra": sorted(map(str, union - full_keys))[:5]}
        pipe.close()

    report["memory"] = {}
    for name in MEMORY_SCHEDULES:
        for m in (8, 16):
            cfg = _cfg(8, 4, name, m)
            mbs = _batches(cfg, m, seed=11)
            pipe, wrapped = _pipeline(cfg, rt)
            _step(pipe, wrapped, mbs)
            metrics = pipe.memory_metrics()
            b_frees = metrics.get("pipeline_b_frees", 0.0)
            sim = simulate(pipe.last_schedule, b_frees=b_frees)
            report["memory"][f"{name}/m{m}"] = {"measured": metrics["pipeline_peak_activation_units"],
                                                "predicted": [r.peak_activation_units for r in sim.ranks],
                                                "b_frees": b_frees}
            pipe.close()


class _SyntheticExtras:
    """Every chunk also emits 0.5 * tanh(hidden); the next chunk adds a quarter of it to its input."""

    def __new__(cls):
        from effdist.pipeline.executor import BoundaryExtras

        class Synthetic(BoundaryExtras):
            may_save_hidden = True

            def __init__(self):
                self.sent = 0

            def specs(self, boundary, hidden):
                return (hidden,)

            def emit(self, chunk, model, hidden):
                import torch

                self.sent += 1
                return (0.5 * torch.tanh(hidden),)

            def consume(self, chunk, model, hidden, extras):
                self.last_extra = extras[0]
                return hidden + 0.25 * extras[0], {}

        return Synthetic()


def _extras_reference(cfg, mbs, layout):
    """All chunks in one process, the boundary functions applied by hand: the math the pipeline must reproduce."""
    import torch

    from effdist.pipeline.chunks import build_chunk, copy_from_full_model
    from effdist.pipeline.wgrad import SPLIT_LINEARS

    torch.manual_seed(cfg.train.seed)
    from effdist.model.gpt import build_gpt, gpt_chunk_builder

    full = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
    build = gpt_chunk_builder(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
    chunks = [build_chunk(build, layout, c, SPLIT_LINEARS) for c in range(layout.num_chunks)]
    copy_from_full_model(chunks, range(layout.num_chunks), layout, full)
    n = _tokens(mbs)
    total = 0.0
    for mb in mbs:
        h = chunks[0](mb["tokens"], mb["position_ids"], None)
        for c in range(1, layout.num_chunks):
            extra = 0.5 * torch.tanh(h)
            chunks[c].set_input_tensor(h + 0.25 * extra)
            last = c == layout.num_chunks - 1
            h = chunks[c](None, None, None, labels=mb["labels"]) if last else chunks[c](None, None, None)
        loss_sum = (h.float() * mb["loss_mask"]).sum()
        (loss_sum / n).backward()
        total += float(loss_sum)
    return total, {(c, name): p.grad.detach().clone() for c, model in enumerate(chunks)
                   for name, p in model.named_parameters()}


def _phase_pp2(report: dict) -> None:
    import torch

    rt = _init(1, 2)
    report["correctness"] = _correctness(rt, 8, 2, 4, SCHEDULES)
    report["uneven"] = _correctness(rt, 5, 2, 3, ("1f1b", "interleaved", "v-half"))

    report["extras"] = {}
    m = 4
    for name in ("1f1b", "zb-h1", "v-zb"):
        cfg = _cfg(8, 2, name, m)
        mbs = _batches(cfg, m, seed=5)
        extras = _SyntheticExtras()
        pipe, wrapped = _pipeline(cfg, rt, extras=extras)
        loss = _step(pipe, wrapped, mbs)
        ref_loss, ref_grads = _extras_reference(cfg, mbs, pipe.layout)
        entry = _compare(pipe, wrapped, ref_grads, key=lambda chunk, pname: (chunk, pname))
        grad_norm = 0.0
        if hasattr(extras, "last_extra") and extras.last_extra.grad is not None:
            grad_norm = float(extras.last_extra.grad.norm())
        t = torch.tensor([float(extras.sent), grad_norm], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        report["extras"][name] = dict(entry, loss=loss, ref_loss=ref_loss, extras_sent=int(t[0]),
                                      extra_grad_norm=float(t[1]))
        pipe.close()

    report["epas"] = {}
    region = frozenset({2, 3, 4})
    for name in ("1f1b", "v-zb"):
        cfg = _cfg(8, 2, name, m, enabled=True, mode="fixed", final_region=3.0)
        mbs = _batches(cfg, m, seed=3)
        ref_loss, ref_grads = _reference(cfg, mbs, region=region)
        pipe, wrapped = _pipeline(cfg, rt, region=region)

        from effdist.epas.controller import qk_boundary_extras

        pipe.set_boundary_extras(qk_boundary_extras(lambda: region, pipe.layout.layers,
                                                    pipe.model_chunks[0].config))
        loss = _step(pipe, wrapped, mbs)
        hidden = pipe.hidden_spec(mbs[0])
        crossing = sum(1 for b in range(pipe.layout.num_chunks - 1) if pipe.extras.specs(b, hidden))
        report["epas"][name] = dict(_compare(pipe, wrapped, ref_grads), loss=loss, ref_loss=ref_loss,
                                    qk_boundaries=crossing)
        pipe.close()

    report["timeline"] = _timeline_checks(rt)
    report["split_linears"] = _split_linear_checks()


def _timeline_checks(rt) -> dict:
    """Per-action timelines (effdist.pipeline.timeline): a plain step and a recorded one, gathered to rank 0,
    drawn beside the simulation; then a step in which rank 0's first action is slowed down."""
    import time as clock

    import torch.distributed as dist

    from effdist.pipeline import executor, timeline
    from effdist.pipeline.render import write_measured_png
    from effdist.pipeline.simulate import simulate

    out: dict = {}
    m = 4
    for name in TIMELINE_SCHEDULES:
        cfg = _cfg(8, 2, name, m)
        mbs = _batches(cfg, m, seed=13)
        pipe, wrapped = _pipeline(cfg, rt)
        try:
            pipe.timeline()
            before = "no error"
        except executor.PipelineError as e:
            before = f"PipelineError: {e}"
        loss_plain = _step(pipe, wrapped, mbs)
        pipe.record_timeline = True
        loss_recorded = _step(pipe, wrapped, mbs)
        measured = timeline.gather_timings(pipe.timeline(), pipe.group)
        if measured is not None:
            png = write_measured_png(measured, simulate(pipe.last_schedule),
                                     Path(os.environ["EFFDIST_TEST_DIR"]) / f"timeline_{name}.png")
            out[name] = {"records": timeline.to_dicts(measured), "png": str(png), "before_recording": before,
                         "loss_plain": loss_plain, "loss_recorded": loss_recorded,
                         "actions": [[str(a) for a in acts] for acts in pipe.last_schedule.actions]}
        pipe.close()

    cfg = _cfg(8, 2, "1f1b", m)
    pipe, wrapped = _pipeline(cfg, rt)
    pipe.record_timeline = True
    original = executor.Pipeline._execute
    if dist.get_rank() == 0:
        first = [True]

        def slow_first(self, action, schedule, state):
            if first[0]:
                first[0] = False
                clock.sleep(0.3)
            return original(self, action, schedule, state)

        executor.Pipeline._execute = slow_first
    try:
        _step(pipe, wrapped, _batches(cfg, m, seed=13))
    finally:
        executor.Pipeline._execute = original
    measured = timeline.gather_timings(pipe.timeline(), pipe.group)
    if measured is not None:
        out["delayed"] = {"records": timeline.to_dicts(measured)}
    pipe.close()
    return out


def _split_linear_checks() -> dict:
    """TP=2 (re-initialised on the same 2 processes): a GPT with the split linears, its weight gradients
    deferred and run afterwards, against the same GPT with megatron's linears; and forward_rows."""
    import torch
    import torch.distributed as dist

    from effdist.model.gpt import build_gpt
    from effdist.model.spec import DEFAULT_LINEARS
    from effdist.pipeline.wgrad import SPLIT_LINEARS, WEIGHT_GRAD_STORE

    _init(2, 1)
    out = {}
    for case, sp in (("tp2", False), ("tp2-sp", True)):
        cfg = _cfg(2, 1, "1f1b", 1, tp=2)
        cfg.parallel.sequence_parallel = sp
        mbs = _batches(cfg, 2, seed=9)
        results = []
        deferred = 0
        for linears in (DEFAULT_LINEARS, SPLIT_LINEARS):
            torch.manual_seed(77)
            model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"),
                              linears=linears)
            loss = 0.0
            for i, mb in enumerate(mbs):
                per_token = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
                loss_sum = (per_token.float() * mb["loss_mask"]).sum()
                if linears is SPLIT_LINEARS:
                    with WEIGHT_GRAD_STORE.deferring(("check", i)):
                        loss_sum.backward()
                    deferred += WEIGHT_GRAD_STORE.run(("check", i))
                else:
                    loss_sum.backward()
                loss += float(loss_sum)
            results.append((loss, {n: p.grad.detach().clone() for n, p in model.named_parameters()}))
        (loss_a, grads_a), (loss_b, grads_b) = results
        diff = max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a)
        out[case] = {"loss_equal": loss_a == loss_b, "max_abs_diff": diff, "deferred": deferred}

    # forward_rows (EPAS' V-only projection) against megatron's linear applied to the same rows through autograd.
    from effdist.model.gpt import transformer_config
    from effdist.model.shared_qk import _column_parallel_forward
    from effdist.pipeline.wgrad import SplitColumnParallelLinear

    cfg = _cfg(2, 1, "1f1b", 1, tp=2)
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.ffn, torch.float32, torch.device("cpu"))
    torch.manual_seed(5)
    layer = SplitColumnParallelLinear(64, 96, config=tcfg, init_method=tcfg.init_method, bias=False, gather_output=False)

    def rows(t):
        return t.view(4, 12, *t.shape[1:])[:, 8:].reshape(16, *t.shape[1:])

    x = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(dist.get_rank()))
    y_ref = _column_parallel_forward(layer, x, rows(layer.weight), None)
    (y_ref * y_ref).sum().backward()
    ref = layer.weight.grad.clone()
    layer.weight.grad = None
    with WEIGHT_GRAD_STORE.deferring("rows"):
        y, _ = layer.forward_rows(x, rows)
        (y * y).sum().backward()
    WEIGHT_GRAD_STORE.run("rows")
    selected = rows(torch.arange(48).view(-1, 1)).reshape(-1)
    others = torch.ones(48, dtype=torch.bool)
    others[selected] = False
    out["forward_rows"] = {"max_abs_diff": float((layer.weight.grad - ref).abs().max()),
                           "other_rows_zero": bool((layer.weight.grad[others] == 0).all())}
    return out


def _phase_fail(report: dict) -> None:
    import torch.distributed as dist

    from effdist.pipeline.executor import BoundaryExtras, PipelineCommError, PipelineError
    from effdist.pipeline.p2p import TensorSpec

    rt = _init(1, 2, timeout_s=5.0)
    cfg = _cfg(4, 2, "1f1b", 2)
    cfg.parallel.timeout_s = 5.0
    mbs = _batches(cfg, 2)

    class Disagreeing(BoundaryExtras):
        def specs(self, boundary, hidden):
            import torch

            return (TensorSpec((3,) if dist.get_rank() == 0 else (4,), torch.float32),)

    pipe, wrapped = _pipeline(cfg, rt, extras=Disagreeing())
    try:
        _step(pipe, wrapped, mbs)
        print("no error for disagreeing signatures", file=sys.stderr)
    except PipelineCommError as e:
        print(f"SIGNATURE-ERROR {e}", file=sys.stderr, flush=True)

    pipe, wrapped = _pipeline(cfg, rt)
    pipe.record_timeline = dist.get_rank() == 0  # only one rank would enter the timeline's barrier
    try:
        _step(pipe, wrapped, mbs)
        print("no error for a timeline recorded on one rank only", file=sys.stderr)
    except PipelineCommError as e:
        print(f"RECORDING-ERROR {e}", file=sys.stderr, flush=True)

    class WrongShape(BoundaryExtras):
        def specs(self, boundary, hidden):
            return (hidden,)

        def emit(self, chunk, model, hidden):
            return (hidden[:, :1],)  # the signature promised the full shape

    pipe, wrapped = _pipeline(cfg, rt, extras=WrongShape())
    flag = Path(os.environ["EFFDIST_TEST_DIR"]) / "rank1-done"
    try:
        _step(pipe, wrapped, mbs)
    except (PipelineCommError, PipelineError) as e:
        tag = "SHAPE-ERROR" if dist.get_rank() == 0 else "PEER-ERROR"
        print(f"{tag} {e}", file=sys.stderr, flush=True)
    if dist.get_rank() == 0:
        # Stay alive (silent) so that rank 1 meets the timeout, not a closed connection.
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    else:
        flag.write_text("done")
    os._exit(0)  # the process group is broken on purpose; skip its teardown


def _phase_dead(report: dict) -> None:
    import torch.distributed as dist

    from effdist.pipeline import executor
    from effdist.pipeline.executor import PipelineCommError

    rt = _init(1, 2, timeout_s=30.0)
    cfg = _cfg(4, 2, "zb-h1", 4)
    mbs = _batches(cfg, 4)
    pipe, wrapped = _pipeline(cfg, rt)
    if dist.get_rank() == 1:
        original = executor.Pipeline._execute
        count = [0]

        def dying(self, action, schedule, state):
            count[0] += 1
            if count[0] == 3:
                os._exit(3)
            return original(self, action, schedule, state)

        executor.Pipeline._execute = dying
    try:
        _step(pipe, wrapped, mbs)
        print("no error although the peer died", file=sys.stderr)
    except PipelineCommError as e:
        print(f"PEER-ERROR {e}", file=sys.stderr, flush=True)
    os._exit(0)


def _worker(phase: str) -> None:
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    report: dict = {}
    {"pp4": _phase_pp4, "pp2": _phase_pp2, "fail": _phase_fail, "dead": _phase_dead}[phase](report)
    if dist.get_rank() == 0:
        Path(os.environ["EFFDIST_TEST_REPORT"]).write_text(json.dumps(report))
    dist.barrier()
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
