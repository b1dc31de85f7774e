"""Does a checkpoint fit a model? Every missing, unexpected or mis-shaped tensor, one line each.

Checked before anything is loaded (HF state dicts, effdist state dicts, megatron dist checkpoints), so a
mismatch becomes one named error listing the tensors (expected vs found shape) and the fix, instead of a
traceback from deep inside megatron's loader, which stops at the first bad tensor. The embedding and
LM head are padded to a multiple of ``make_vocab_size_divisible_by * tp`` rows, so their row counts may
differ between layouts; the real vocabulary is compared through the configs instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

Shape = tuple[int, ...]

# Config keys that change the shape (or the set) of the tensors a checkpoint holds. Loading across a
# change of any of them cannot work; every other key (parallel layout, batch, schedule, ...) may change.
SHAPE_KEYS = (
    "model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.num_query_groups",
    "model.ffn_hidden_size", "model.vocab_size", "model.make_vocab_size_divisible_by", "model.tie_embeddings",
    "ffn.kind", "ffn.layers", "ffn.elas_expand", "ffn.elas_rank",
)

# Shown in full up to this many tensors; the rest are counted (one config change can touch every layer).
MAX_LISTED = 12

_MISSING = object()


def config_changes(saved_config: Mapping[str, Any], config: Mapping[str, Any],
                   keys: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, configured value) for every "section.name" of `keys` that differs; a key the
    checkpoint's config lacks (written before the key existed) says nothing and is skipped."""
    def get(d: Mapping[str, Any], key: str) -> Any:
        section, name = key.split(".")
        return d.get(section, {}).get(name, _MISSING)

    out = []
    for key in keys:
        saved, now = get(saved_config, key), get(config, key)
        if saved is not _MISSING and saved != now:
            out.append((key, saved, now))
    return out


def shape_changes(saved_config: Mapping[str, Any], config: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, configured value) for every SHAPE_KEYS entry that differs."""
    return config_changes(saved_config, config, SHAPE_KEYS)


def _fmt(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def shape_problems(expected: Mapping[str, Shape], found: Mapping[str, Shape], *, unexpected: bool = True,
                   vocab_rows: frozenset[str] = frozenset(), found_name: str = "the checkpoint") -> list[str]:
    """One line per tensor of `expected` that `found` lacks or holds with another shape, and (with
    `unexpected`) per tensor of `found` that `expected` lacks. Tensors named in `vocab_rows` may differ
    in their first dimension (vocabulary padding)."""
    lines = []
    for key, shape in expected.items():
        got = found.get(key)
        if got is None:
            lines.append(f"{key}: missing from {found_name} (expected {_fmt(shape)})")
        elif tuple(got) != tuple(shape):
            if key in vocab_rows and tuple(got)[1:] == tuple(shape)[1:]:
                continue
            lines.append(f"{key}: expected {_fmt(shape)}, {found_name} has {_fmt(tuple(got))}")
    if unexpected:
        lines += [f"{key}: in {found_name} ({_fmt(tuple(shape))}) but not in this model"
                  for key, shape in found.items() if key not in expected]
    return lines


def vocab_problem(saved_config: Mapping[str, Any] | None, config: Mapping[str, Any]) -> str | None:
    """The vocabulary line when both configs are known and their model.vocab_size differ."""
    if not saved_config:
        return None
    saved = saved_config.get("model", {}).get("vocab_size")
    now = config.get("model", {}).get("vocab_size")
    if saved is None or saved == now:
        return None
    return f"vocabulary: {saved} tokens in the checkpoint, {now} in this model (model.vocab_size)"


def mismatch_message(header: str, problems: list[str], fix: str) -> str:
    """`header`, then one indented line per problem (the first MAX_LISTED, then a count), then the fix."""
    shown = problems[:MAX_LISTED]
    if len(problems) > MAX_LISTED:
        shown.append(f"... and {len(problems) - MAX_LISTED} more")
    return "\n".join([header] + [f"  {line}" for line in shown] + [f"  fix: {fix}"])


def config_fix(changes: list[tuple[str, Any, Any]]) -> str:
    """`--set key=value` for every key the checkpoint has another value of (the changes `config_changes` lists)."""
    return " ".join(f"--set {key}={_yaml_value(saved)}" for key, saved, _ in changes)


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------- megatron dist checkpoints

def sharded_shapes(sharded_state_dict: Any) -> tuple[dict[str, Shape], frozenset[str]]:
    """(global shape of every ShardedTensor under its checkpoint key, the keys that may differ in their
    first dimension: megatron marks the padded vocabulary tensors allow_shape_mismatch)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    shapes, vocab = {}, set()

    def add(values) -> None:
        for v in values:
            if isinstance(v, ShardedTensorFactory):  # e.g. SwiGLU's fc1, saved as its gate and up halves
                built = v.build()
                add(nested_values(built) if isinstance(built, (dict, list)) else [built])
            elif isinstance(v, ShardedTensor):
                shapes[v.key] = tuple(v.global_shape)
                if v.allow_shape_mismatch:
                    vocab.add(v.key)

    add(nested_values(sharded_state_dict))
    return shapes, frozenset(vocab)


def dist_checkpoint_shapes(path: str | Path, prefix: str = "model.") -> dict[str, Shape]:
    """Global shape of every tensor a dist_checkpointing directory holds under `prefix` (metadata only)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(path))
    return {k: tuple(v.global_shape) for k, v in metadata.items()
            if k.startswith(prefix) and hasattr(v, "global_shape")}


def dist_checkpoint_problems(path: str | Path, sharded_state_dict: Any, saved_config: Mapping[str, Any] | None,
                             config: Mapping[str, Any], whole_model: bool = True) -> list[str]:
    """Every way the dist checkpoint at `path` does not fit the model whose sharded state dict is given:
    its vocabulary (when both configs are known), then the tensors. `whole_model` false (a pipeline stage
    holding part of the layers): tensors only the checkpoint has are not reported."""
    expected, vocab_rows = sharded_shapes(sharded_state_dict)
    problems = [p for p in [vocab_problem(saved_config, config)] if p]
    if problems or not saved_config:  # without configs, the padded rows are all there is to compare
        vocab_rows = frozenset()
    return problems + shape_problems(expected, dist_checkpoint_shapes(path), unexpected=whole_model,
                                     vocab_rows=vocab_rows)
