#!/usr/bin/env python
"""Convert between Hugging Face LLaMA checkpoints and effdist models (same as `effdist convert`).

    python tools/convert_hf.py hf-to-effdist --hf-dir TinyLlama-1.1B --out tinyllama.pt --config-out tinyllama.yaml
    python tools/convert_hf.py hf-to-effdist --hf-dir TinyLlama-1.1B --out tinyllama_dist --format dist
    python tools/convert_hf.py effdist-to-hf --checkpoint tinyllama.pt --out TinyLlama-back

The command is effdist/train/convert.py; the tensor layouts are in effdist/model/hf_convert.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effdist.train.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
