"""`python -m effdist.train` (and `torchrun ... -m effdist.train`): the same flags as `effdist train`."""

import sys

from effdist.runtime.lifecycle import note_launcher, report_interrupt, report_os_error

if __name__ == "__main__":
    note_launcher()  # before seconds of imports: the launcher's death is noticed even while this process starts
    try:
        from effdist.train.trainer import main

        code = main()
    except KeyboardInterrupt:  # before the trainer handles Ctrl-C itself: one line, not a traceback from an import
        code = report_interrupt("train", while_starting=True)
    except OSError as e:  # e.g. a run directory that cannot be written: name it, no traceback
        code = report_os_error("train", e)
    sys.exit(code)
