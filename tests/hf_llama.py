"""A small random transformers.LlamaForCausalLM for conversion tests (transformers: the pyproject dev extra)."""

from __future__ import annotations

import torch


def make_llama(path, **config):
    """A random LlamaForCausalLM of `config` (LlamaConfig keywords), saved as safetensors under `path`."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF initialises norms to 1: make them tell layers apart
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    return model
