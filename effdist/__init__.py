"""effdist: efficient LLaMA-style pretraining on megatron-core."""

__version__ = "0.1.0"

# Before anything imports megatron-core: drop its start-up notes that do not concern effdist (by exact
# message; see the module for why each is harmless).
from effdist.runtime import third_party_notes as _third_party_notes  # noqa: E402

_third_party_notes.install()
