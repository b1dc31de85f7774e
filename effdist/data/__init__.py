"""Data: sample corpus, tokenizers, preprocessing to megatron .bin/.idx, verification, and the loader.

Import the submodules directly (effdist.data.loader, .tokenizer, .preprocess, .verify, .sample_corpus):
this package does not import them eagerly, so `effdist tokenizer` does not pay for megatron's import.
"""
