#!/usr/bin/env python
"""Same as `effdist tokenizer`: train a byte-level BPE on local text, or inspect a tokenizer.json.

    python tools/train_tokenizer.py train --input corpus.jsonl --vocab-size 32000 --output data/tokenizer.json
    python tools/train_tokenizer.py show data/tokenizer.json --text "Hello world"

See docs/data.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from effdist.data.tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
