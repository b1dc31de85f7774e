"""Generation with a KV cache and a chosen EPAS region (`effdist generate`).

model.py     the inference forward over a checkpoint's weights: prefill (SDPA) and cached decode in
             which sharing layers reuse their anchor's attention probabilities
cache.py     SharingPlan (which layers share, their anchors) and KVCache (K for anchors only, V for all)
graphs.py    DecodeRunner: decode steps eagerly or as bucketed CUDA graphs
generate.py  Generator (checkpoint loading, batching, sampling) and the `effdist generate` command
"""

from effdist.infer.cache import KVCache, SharingPlan, kv_cache_bytes
from effdist.infer.generate import Generation, GenerationError, Generator, RegionWarning
from effdist.infer.graphs import DecodeRunner
from effdist.infer.model import InferenceModel, ModelShape

__all__ = ["DecodeRunner", "Generation", "GenerationError", "Generator", "InferenceModel", "KVCache", "ModelShape",
           "RegionWarning", "SharingPlan", "kv_cache_bytes"]
