"""``python -m experiments.cub_200 ARGS`` on a disk that fills up, for the tests.

``python tests/fault_injection.py STAGE STEP ARGS...`` runs the command line as its program
(as ``python -m`` does), except that saving STAGE's checkpoint of step STEP fails
the way a full disk fails: part of the checkpoint is on disk under Orbax's temporary name, then
``OSError(ENOSPC)``. Nothing else differs, so the exit code, the output and what is left on disk
are the program's own.
"""

from __future__ import annotations

import errno
import os
import sys


def main() -> None:
    stage, step = sys.argv[1], int(sys.argv[2])
    sys.argv = ["experiments.cub_200", *sys.argv[3:]]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import cub_200  # imports no JAX: its main sets JAX's CPU options first

    set_up_tensorflow = cub_200.set_up_tensorflow

    def set_up_tensorflow_then_fill_the_disk():
        set_up_tensorflow()  # main calls it after the CPU options, before it imports JAX
        from fgnet_jax import checkpoint

        save = checkpoint.StageCheckpointer.save

        def save_on_a_full_disk(self, at_step, state, *args, **kwargs):
            if os.path.basename(self.directory) == stage and at_step == step:
                partial = os.path.join(self.directory, "latest", f"{at_step}.orbax-checkpoint-tmp")
                os.makedirs(partial, exist_ok=True)
                with open(os.path.join(partial, "part_of_the_state"), "wb") as handle:
                    handle.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(partial, "state"))
            return save(self, at_step, state, *args, **kwargs)

        checkpoint.StageCheckpointer.save = save_on_a_full_disk

    cub_200.set_up_tensorflow = set_up_tensorflow_then_fill_the_disk
    cub_200._IS_PROGRAM = True  # as under python -m: a storage error ends the process at once
    cub_200.command_line(sys.argv)


if __name__ == "__main__":
    main()
