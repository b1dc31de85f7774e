"""effdist: efficient LLaMA-style pretraining on megatron-core."""

__version__ = "0.1.0"
