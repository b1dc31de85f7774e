#!/usr/bin/env python
"""Same as `effdist preprocess`: tokenize text into megatron .bin/.idx datasets.

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer data/tokenizer.json --output-prefix data/corpus

See docs/data.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from effdist.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
