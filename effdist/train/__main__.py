"""`python -m effdist.train` (and `torchrun ... -m effdist.train`): the same flags as `effdist train`."""

import sys

from effdist.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
