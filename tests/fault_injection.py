"""Run `crma train` or `crma cl` in this process and SIGKILL it at a checkpoint (tests only).

    python tests/fault_injection.py WHEN STEP RUN_NAME -- <crma argv>

WHEN is `after_checkpoint` (die once the save of STEP is committed) or `during_save` (die while
the asynchronous save of STEP is in flight); RUN_NAME limits the fault to the run directory of
that name (`*` for any). The fault is injected through the programs' `on_checkpoint` callback,
from outside the program: nothing in the library or the CLI reads an environment switch.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    from crma_jax.train.cli import build_parser
    from crma_jax.train.config import TrainConfig, config_from_args
    from crma_jax.train.continual import CLConfig, run_continual
    from crma_jax.train.finetune import train

    when, step, where, sep, *crma_argv = argv
    assert sep == "--" and when in ("after_checkpoint", "during_save"), argv

    def hook(saved: int, manager: Any) -> None:
        if saved == int(step) and where in ("*", Path(manager.directory).parent.name):
            if when == "after_checkpoint":
                manager.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)

    args = build_parser().parse_args(crma_argv)
    if args.command == "train":
        train(config_from_args(args, TrainConfig), on_checkpoint=hook)
    elif args.command == "cl":
        run_continual(config_from_args(args, CLConfig, {"domains": ",".join(args.domain)} if args.domain else None),
                      on_checkpoint=hook)
    else:
        raise SystemExit(f"fault injection supports train and cl, not {args.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
