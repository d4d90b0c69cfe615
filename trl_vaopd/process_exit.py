"""Ending a launched training process without an abort at interpreter shutdown.

With several processes on CPU (gloo), a rank that reaches interpreter shutdown while the process group's C++ objects
are still alive (DeepSpeed's ZeRO-3 parameters and communication state keep references to the group after
`destroy_process_group`) aborts now and then with `terminate called without an active exception`, after everything
has been saved: measured in about 1 of 30 two-process ZeRO-3 runs of `examples/train_vaopd.py` on this project's CI
machines, with `<no Python frame>` on the aborting rank (PyTorch's gloo teardown during finalization). The launcher
then reports the run as failed.
"""

from __future__ import annotations

import logging
import os
import sys

from accelerate import Accelerator


__all__ = ["end_run"]


def end_run(accelerator: Accelerator) -> None:
    """End a training script's process: every rank waits for the others (all saving done), the trackers finish and the
    process group is destroyed; then, with several processes, the process exits at once (status 0, output flushed),
    skipping the interpreter's teardown where gloo aborts. A single process returns normally.

    Call it last in a script's `__main__` block, after the trainer has saved what it should: nothing after it runs in
    a multi-process run, `atexit` handlers included.
    """
    several = accelerator.num_processes > 1
    if several:
        accelerator.wait_for_everyone()
    accelerator.end_training()
    if several:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
