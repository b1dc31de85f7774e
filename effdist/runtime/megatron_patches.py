"""Every place effdist changes megatron-core, or leans on a part of it that is not a public extension point.

Checked against megatron-core 0.16.1 (`CHECKED_VERSION`; pyproject pins ``>=0.16.1,<0.17``). Two kinds:

**Patches**: writes into megatron's (or torch's) module globals. Each group below is a `PatchSet` that logs
every attribute it replaces, installs idempotently and `uninstall()`s exactly what it wrote, in reverse order.
Nothing is installed by importing a module; the callers named with each group install it when it is needed.

1. ``layer-offset`` (`install_layer_offset`, called by effdist.model.gpt.build_gpt): megatron's
   ``get_transformer_layer_offset`` (in ``transformer_layer`` and ``transformer_block``, which imports the
   name) returns a TransformerConfig's ``effdist_layer_offset`` when it has one. Why: each pipeline chunk is a
   standalone GPTModel built for a list of global layers (V placements are not megatron's round-robin);
   layer numbers and checkpoint keys must stay global. megatron offers no slot for the offset.
2. ``rope-slot`` (`fill_rope_slot`, called by effdist.model.fused.install_fused_rope): fills
   ``rope_utils.fused_apply_rotary_pos_emb`` (None without Transformer Engine) with effdist's Triton RoPE,
   so ``apply_rope_fusion=True`` routes every RoPE through it. A filled slot (TE's) is kept.
3. ``wgrad-extension`` (`fill_wgrad_extension`, called by effdist.model.wgrad_fusion.install_wgrad_fusion):
   puts effdist's torch implementation of apex's ``fused_weight_gradient_mlp_cuda`` where
   ``tensor_parallel.layers`` looks for it (the module global, ``_grad_accum_fusion_available`` and a
   ``sys.modules`` entry for megatron.core.utils' lazy import). An installed apex is kept.
4. ``cpu`` (`install_cpu`, called by effdist.runtime.distributed on a machine without CUDA; also
   effdist.runtime.cpu_compat): ``torch.cuda.current_device()`` returns the CPU device and
   ``torch.cuda.synchronize()`` does nothing (megatron allocates on the current CUDA device and
   dist_checkpointing synchronises before host copies); megatron's tensor-parallel RNG tracker forks the CPU
   generator, and recompute saves and restores the CPU generator's state. Code paths that still hard-code
   ``"cuda"`` (megatron's optimizer wrappers, clip_grads, pipeline schedules) are not used by effdist on CPU.
5. ``write-results`` (`install_write_results`, called by effdist.runtime.lifecycle.bind_megatron_async_helpers
   and by `write_results_in_process`): ``filesystem_async._get_write_results_queue``, where a checkpoint's
   write results travel from the writer to the finalize step. megatron always creates a *spawn*-context
   ``multiprocessing.Manager`` for them: a fresh interpreter that imports torch (~1.3 s CPU, and the first
   save waits for it) and, unbound, outlives a SIGKILLed rank. The replacement hands a synchronous save
   (inside `write_results_in_process`: writer and finalize run in this process) a plain ``queue.Queue``, and
   an asynchronous one (written in a forked process) the manager, started with the caller's initializer
   (the trainer binds it to its rank: it dies with the rank).
6. ``lazy-jit`` (`import_megatron`, through `megatron_version`, i.e. before any install above and so before
   the trainer's first megatron import): megatron binds ``jit_fuser = torch.compile`` and decorates about 40
   functions with it at import time; the first ``torch.compile`` call imports torch._dynamo and inductor,
   ~0.9 s of CPU in every process whether or not a decorated function ever runs. While megatron imports,
   ``torch.compile(fn)`` returns a wrapper that calls ``torch.compile(fn)`` on its first call, which is when
   torch would compile anyway; ``torch.compile`` itself is restored at once. Not a `PatchSet`: nothing stays
   replaced (``jit_fuser`` keeps the lazy decorator).

**Overrides**: effdist subclasses that replace a private method of megatron, or rely on the body of one
(which arguments it passes, which hook it calls). They stay in their classes; `RELIANCES` lists each with
the sha256 of the megatron source it was written against, and tests/test_megatron_patches.py fails when
megatron's source differs: re-read that code, adapt the override, then update the fingerprint.

Each patch and override names what would let it go in its entry (``exit``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

import torch

CHECKED_VERSION = "0.16.1"
SUPPORTED = ((0, 16, 1), (0, 17, 0))  # [low, high): pyproject's megatron-core>=0.16.1,<0.17

_MISSING = object()


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is outside the versions these patches were checked against."""


def megatron_version() -> str:
    return import_megatron().__version__


def import_megatron():
    """``megatron.core``, imported with its jit fuser made lazy (patch 6, ``lazy-jit``) when this is the first
    import in the process."""
    if "megatron.core" not in sys.modules:
        with _lazy_torch_compile():
            import megatron.core  # noqa: F401
    return sys.modules["megatron.core"]


@contextlib.contextmanager
def _lazy_torch_compile():
    """While megatron-core imports, ``torch.compile(fn)`` returns a wrapper that compiles on its first call."""
    real = torch.compile

    def lazy_compile(model=None, **kwargs):
        if model is None:  # decorator with arguments: @torch.compile(mode=...)
            return lambda fn: lazy_compile(fn, **kwargs)
        if not inspect.isfunction(model):  # modules and other callables: as torch would
            return real(model, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)

        return call

    torch.compile = lazy_compile
    try:
        yield
    finally:
        torch.compile = real


def _as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())


def check_version(version: str | None = None) -> None:
    """MegatronVersionError naming the installed version unless it lies in the checked range."""
    version = megatron_version() if version is None else version
    low, high = SUPPORTED
    if not low <= _as_tuple(version) < high:
        raise MegatronVersionError(
            f"megatron-core {version}: effdist's megatron patches (effdist.runtime.megatron_patches) were checked "
            f"against {CHECKED_VERSION}; install megatron-core>=0.16.1,<0.17")


class PatchSet:
    """One named group of writes into other modules, logged so that `uninstall` restores each one."""

    def __init__(self, name: str):
        self.name = name
        self._log: list[tuple[Any, Any, Any, bool]] = []  # (owner, key, previous value, is a mapping item)

    @property
    def installed(self) -> bool:
        return bool(self._log)

    def set_attr(self, owner: Any, name: str, value: Any) -> None:
        self._log.append((owner, name, getattr(owner, name, _MISSING), False))
        setattr(owner, name, value)

    def set_item(self, mapping: dict, key: Any, value: Any) -> None:
        self._log.append((mapping, key, mapping.get(key, _MISSING), True))
        mapping[key] = value

    def uninstall(self) -> None:
        """Undo every write, newest first."""
        while self._log:
            owner, key, previous, is_item = self._log.pop()
            if is_item:
                if previous is _MISSING:
                    owner.pop(key, None)
                else:
                    owner[key] = previous
            elif previous is _MISSING:
                delattr(owner, key)
            else:
                setattr(owner, key, previous)


LAYER_OFFSET = PatchSet("layer-offset")
ROPE_SLOT = PatchSet("rope-slot")
WGRAD_EXTENSION = PatchSet("wgrad-extension")
CPU = PatchSet("cpu")
WRITE_RESULTS = PatchSet("write-results")
PATCH_SETS = (LAYER_OFFSET, ROPE_SLOT, WGRAD_EXTENSION, CPU, WRITE_RESULTS)


def installed_patches() -> list[str]:
    return [p.name for p in PATCH_SETS if p.installed]


def uninstall_all() -> None:
    for patches in reversed(PATCH_SETS):
        patches.uninstall()


# ------------------------------------------------------------------------------------ 1. layer offset

def install_layer_offset() -> None:
    """Make megatron's layer-offset function return a chunk config's ``effdist_layer_offset``. Idempotent."""
    if LAYER_OFFSET.installed:
        return
    check_version()
    from megatron.core.transformer import transformer_block, transformer_layer

    original = transformer_layer.get_transformer_layer_offset

    def get_transformer_layer_offset(config, vp_stage=None, pp_rank=None):
        offset = getattr(config, "effdist_layer_offset", None)
        if offset is not None:
            return offset
        return original(config, vp_stage, pp_rank)

    get_transformer_layer_offset.__doc__ = original.__doc__
    LAYER_OFFSET.set_attr(transformer_layer, "get_transformer_layer_offset", get_transformer_layer_offset)
    LAYER_OFFSET.set_attr(transformer_block, "get_transformer_layer_offset", get_transformer_layer_offset)


# ------------------------------------------------------------------------------------ 2. RoPE slot

def fill_rope_slot(kernel: Callable) -> bool:
    """Put ``kernel`` in megatron's fused-RoPE slot when it is empty. True when ``kernel`` is in the slot,
    False when another one (Transformer Engine's, equivalent) already was."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        check_version()
        ROPE_SLOT.set_attr(rope_utils, "fused_apply_rotary_pos_emb", kernel)
    return rope_utils.fused_apply_rotary_pos_emb is kernel


# ------------------------------------------------------------------------------------ 3. wgrad extension

def fill_wgrad_extension(extension: Any) -> bool:
    """Put ``extension`` (a module with apex's ``wgrad_gemm_accum_fp32/fp16``) where megatron-core looks for
    apex's ``fused_weight_gradient_mlp_cuda``. Idempotent. True when ``extension`` is in the slot; False when
    apex's extension already is (same contract: kept)."""
    from megatron.core.tensor_parallel import layers

    name = extension.__name__
    current = getattr(layers, name, None)
    if layers._grad_accum_fusion_available and current is not extension:
        return False
    if current is extension and layers._grad_accum_fusion_available:
        return True
    check_version()
    WGRAD_EXTENSION.set_attr(layers, name, extension)
    WGRAD_EXTENSION.set_attr(layers, "_grad_accum_fusion_available", True)
    if name not in sys.modules:
        WGRAD_EXTENSION.set_item(sys.modules, name, extension)
    return True


# ------------------------------------------------------------------------------------ 4. CPU

def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker API over the CPU generator: named states, forked in and out."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CPURNGStatesTracker


def install_cpu() -> None:
    """Make megatron-core usable on a machine without CUDA. Idempotent."""
    if CPU.installed:
        return
    check_version()
    from megatron.core.tensor_parallel import random as mrandom

    CPU.set_attr(torch.cuda, "current_device", _cpu_current_device)
    # dist_checkpointing synchronises the device before copying tensors to host; nothing to wait for.
    CPU.set_attr(torch.cuda, "synchronize", lambda *a, **k: None)
    CPU.set_attr(mrandom, "_CUDA_RNG_STATE_TRACKER", _make_cpu_tracker_class()())
    CPU.set_attr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    # Recompute (CheckpointFunction) saves and restores "the CUDA RNG state" around the recomputed
    # forward; on CPU that state is the CPU generator's, already handled by torch.get/set_rng_state.
    CPU.set_attr(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    CPU.set_attr(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # initialize_rng_tracker would replace our tracker with a CUDA one.
    CPU.set_attr(mrandom, "initialize_rng_tracker", lambda *a, **k: None)


# ------------------------------------------------------------------------------------ 5. write results

_results_in_process = 0  # >0 while a synchronous save runs in this process (write_results_in_process)
_manager_initializer: tuple[Callable | None, tuple] = (None, ())  # what the manager's server runs first


def install_write_results(initializer: Callable | None = None, initargs: tuple = ()) -> None:
    """Route dist_checkpointing's write results: an in-process queue for synchronous saves (inside
    `write_results_in_process`), else megatron's spawn-context manager queue, its server process started with
    ``initializer(*initargs)``. Idempotent; an initializer given later (the trainer's, after a conversion saved
    in the same process) still applies to a manager not started yet."""
    global _manager_initializer
    if initializer is not None:
        _manager_initializer = (initializer, initargs)
    if WRITE_RESULTS.installed:
        return
    check_version()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def get_write_results_queue():
        if _results_in_process:
            import queue

            return queue.Queue()  # put by the writer, read by finalize: both in this process
        if filesystem_async._results_queue is None:
            import multiprocessing
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=_manager_initializer[0], initargs=_manager_initializer[1])
            filesystem_async._effdist_manager = manager  # keep the manager (and its process) referenced
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    WRITE_RESULTS.set_attr(filesystem_async, "_get_write_results_queue", get_write_results_queue)


@contextlib.contextmanager
def write_results_in_process():
    """Around a synchronous ``dist_checkpointing.save``: its write results stay in this process (no manager
    process is started for them)."""
    global _results_in_process
    install_write_results()
    _results_in_process += 1
    try:
        yield
    finally:
        _results_in_process -= 1


# ------------------------------------------------------------------------------------ what effdist relies on

@dataclass(frozen=True)
class Reliance:
    """A piece of megatron-core that a patch replaces or an effdist override depends on, with the sha256
    (first 16 hex digits) of its dedented source at CHECKED_VERSION."""

    target: str        # "module:qualified.name"
    source_sha256: str
    used_by: str       # the patch set or effdist class that depends on it
    why: str
    exit: str          # what would let effdist drop the dependency


RELIANCES: tuple[Reliance, ...] = (
    Reliance("megatron.core.transformer.transformer_layer:get_transformer_layer_offset", "841de49f82bd7cc2",
             "layer-offset", "wrapped: returns effdist_layer_offset of a chunk's TransformerConfig",
             "a layer-offset argument or config field in megatron's TransformerBlock"),
    Reliance("megatron.core.transformer.transformer_block:TransformerBlock.forward", "fd9a40f277ab00aa",
             "layer-offset; effdist.model.shared_qk.EpasTransformerLayer",
             "the block numbers its layers through the offset function and threads `context` from layer to layer "
             "(EPAS passes the anchor's Q/K in it)", "a context slot in megatron's layer API"),
    Reliance("megatron.core.models.common.embeddings.rope_utils:apply_rotary_pos_emb", "2752798f27ef46ca",
             "rope-slot", "calls fused_apply_rotary_pos_emb when config.apply_rope_fusion is set",
             "megatron taking a RoPE function from the spec or config"),
    Reliance("megatron.core.tensor_parallel.layers:LinearWithGradAccumulationAndAsyncCommunication.backward",
             "e281bfafbd3c0041", "wgrad-extension",
             "calls wgrad_gemm_accum_fp32/fp16(input, grad_output, main_grad) and sets grad_added_to_main_grad",
             "megatron accumulating into main_grad with torch's addmm(out_dtype=float32) itself"),
    Reliance("megatron.core.tensor_parallel.layers:ColumnParallelLinear.__init__", "35b869813df05fca",
             "wgrad-extension", "refuses gradient_accumulation_fusion unless _grad_accum_fusion_available",
             "as above"),
    Reliance("megatron.core.tensor_parallel.random:CudaRNGStatesTracker", "0194c15fce9418b7", "cpu",
             "subclassed by the CPU tracker (add, fork over the CPU generator)", "a CPU-aware RNG tracker upstream"),
    Reliance("megatron.core.tensor_parallel.random:_get_cuda_rng_state", "aa26caaa069c5c4f", "cpu",
             "replaced: recompute saves the CPU generator's state", "as above"),
    Reliance("megatron.core.tensor_parallel.random:_set_cuda_rng_state", "b179c9d95438b61c", "cpu",
             "replaced: recompute restores the CPU generator's state", "as above"),
    Reliance("megatron.core.tensor_parallel.random:initialize_rng_tracker", "4bc461df7c7f7a43", "cpu",
             "replaced by a no-op: it would install a CUDA tracker over the CPU one", "as above"),
    Reliance("megatron.core.tensor_parallel.random:get_cuda_rng_tracker", "6b91df8078dcd24b", "cpu",
             "returns the module global _CUDA_RNG_STATE_TRACKER that the CPU patch sets", "as above"),
    Reliance("megatron.core.dist_checkpointing.strategies.filesystem_async:_get_write_results_queue", "349269cbdd569d41",
             "write-results", "replaced: in-process queue for synchronous saves, a bound manager otherwise",
             "megatron collecting a synchronous save's results without a manager process"),
    Reliance("megatron.core.dist_checkpointing.strategies.filesystem_async:FileSystemWriterAsync", "806d015cf7502ef2",
             "write-results", "prepare_write_data gets the queue, write_preloaded_data_multiproc puts one result, "
             "retrieve_write_results reads it with get_nowait (raising queue.Empty)", "as above"),
    Reliance("megatron.core.jit:enable_jit_fuser", "0714694302faf5a4", "lazy-jit",
             "binds jit_fuser to torch.compile at import (torch >= 2.2), so the decorators get the lazy wrapper",
             "megatron deferring torch.compile, or importing its fusions only where they are used"),
    Reliance("megatron.core.models.gpt.gpt_model:GPTModel._postprocess", "4505ad260ada9b1e",
             "effdist.model.fused.FusedLossGPTModel",
             "private method overridden: the training loss without fp32 logits; binds its signature by name",
             "a loss slot in GPTModel (megatron's own fused cross-entropy needs Transformer Engine)"),
    Reliance("megatron.core.transformer.mlp:MLP.forward", "2ee34083b4c48603", "effdist.model.fused.FusedSwiGLUMLP",
             "its use_te_activation_func branch hands the activation module the unsplit fc1 output",
             "an activation slot that receives [gate | up] without the TE flag"),
    Reliance("megatron.core.transformer.attention:Attention.forward", "9893f5b6016c82ef",
             "effdist.model.shared_qk.EpasSelfAttention",
             "calls get_query_key_value_tensors, then applies RoPE only when rotary_pos_emb is given (EPAS moves "
             "RoPE into the Q/K step and passes None)", "a Q/K source slot in megatron's SelfAttention"),
    Reliance("megatron.core.transformer.attention:SelfAttention.get_query_key_value_tensors", "5b474a5e1c6b664e",
             "effdist.model.shared_qk.EpasSelfAttention", "overridden: Q/K from the anchor, V rows only",
             "as above"),
    Reliance("megatron.core.models.common.embeddings.yarn_rotary_pos_embedding:"
             "_yarn_get_concentration_factor_from_config", "f0d616337c1dac4e",
             "effdist.model.shared_qk.EpasSelfAttention",
             "private helper called to apply RoPE exactly as Attention.forward does", "as above"),
    Reliance("megatron.core.transformer.transformer_layer:TransformerLayer.forward", "4b6a105a491a1984",
             "effdist.model.shared_qk.EpasTransformerLayer", "returns (output, context); EPAS returns its Q/K as "
             "the new context", "a context slot in megatron's layer API"),
    Reliance("megatron.core.tensor_parallel.layers:ColumnParallelLinear._forward_impl", "81171d60c115bd92",
             "effdist.model.fp8.Fp8ColumnParallelLinear", "private method overridden: the FP8 GEMM",
             "an FP8 GEMM slot in megatron's linears without Transformer Engine"),
    Reliance("megatron.core.tensor_parallel.layers:RowParallelLinear._forward_impl", "81171d60c115bd92",
             "effdist.model.fp8.Fp8RowParallelLinear", "private method overridden: the FP8 GEMM", "as above"),
)


def _unpatched(owner: Any, name: str) -> Any:
    """``owner.name`` as megatron defines it, even while a patch set here has replaced it."""
    for patches in PATCH_SETS:
        for logged_owner, key, previous, is_item in patches._log:
            if logged_owner is owner and key == name and not is_item and previous is not _MISSING:
                return previous
    return getattr(owner, name)


def resolve(target: str) -> Any:
    """The object ``"module:qualified.name"`` names (the original where a patch here replaced it)."""
    module, qualname = target.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = _unpatched(obj, part)
    return obj


def source_sha256(target: str) -> str:
    """The first 16 hex digits of the sha256 of ``target``'s dedented source."""
    source = textwrap.dedent(inspect.getsource(resolve(target)))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def changed_reliances() -> list[str]:
    """One line per entry of RELIANCES whose megatron source differs from the one it was checked against."""
    out = []
    for r in RELIANCES:
        try:
            found = source_sha256(r.target)
        except (ImportError, AttributeError, OSError, TypeError) as e:
            out.append(f"{r.target}: not found in megatron-core {megatron_version()} ({e}); used by {r.used_by}")
            continue
        if found != r.source_sha256:
            out.append(f"{r.target}: source changed since megatron-core {CHECKED_VERSION} (sha256 {found}, checked "
                       f"{r.source_sha256}); re-check {r.used_by}: {r.why}")
    return out
