"""`python -m effdist.train` (and `torchrun ... -m effdist.train`): the same flags as `effdist train`."""

import sys

from effdist.cli import main as cli_main

if __name__ == "__main__":
    # Through the CLI: a Ctrl-C while torch and megatron are imported ends with one line, not a traceback.
    sys.exit(cli_main(["train", *sys.argv[1:]]))
