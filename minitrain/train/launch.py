"""The one seam between `minitrain train` and torchrun: check, write the run's parameters, spawn, wait.

`run_training(config)` is what the CLI calls. In the parent it runs the checks of
`minitrain.train.preflight`, writes OUT/training_params.json (`minitrain.rundir`), then runs
`python -m torch.distributed.run ... -m minitrain.train.worker OUT` and returns its exit code, forwarding
SIGINT/SIGTERM. When the process is already one rank of a launch (torchrun or a multi-task `srun` set the
environment), it runs the worker in-process instead of nesting torchrun. `python -m minitrain.train.launch`
is torchrun with its failures as one line each.

This module imports torch only inside functions: building and asserting the command line is cheap.
"""

from __future__ import annotations

if __name__ == "__main__":  # torchrun's process: started with SIGINT/SIGTERM blocked (see train.faults)
    from minitrain.train.faults import start_quietly

    start_quietly()

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from minitrain.config import TrainConfig, usable_cores
from minitrain.errors import signal_exit_code
from minitrain.rundir import write_training_params
from minitrain.train.preflight import Inputs, fit_to_gpus, in_launched_env, preflight


def default_nproc() -> int:
    """Processes per node when --nproc is not given: the visible GPUs, or 1 without any."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def torchrun_command(config: TrainConfig, *, python: str = sys.executable) -> list[str]:
    """The torchrun command line for `config`: standalone on one node, c10d rendezvous across several.

    It runs torchrun through `torchrun_main` below (same arguments as `python -m torch.distributed.run`), so
    a failed or interrupted run ends with one line per failed rank instead of torchrun's traceback.
    """
    cmd = [python, "-m", "minitrain.train.launch", "--nproc-per-node", str(config.nproc)]
    if config.nnodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        cmd += [
            "--nnodes", str(config.nnodes),
            "--node-rank", str(config.node_rank),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", str(config.rdzv_endpoint),
            "--rdzv-id", config.rdzv_id,
        ]  # fmt: skip
    return cmd + ["-m", "minitrain.train.worker", str(config.output_dir)]


def run_command(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run `cmd` in its own session, forward SIGINT/SIGTERM to it, and return its exit code.

    Its own session, so a Ctrl+C in the terminal reaches the workers once (through torchrun, which forwards
    the signal to every rank) rather than twice (directly from the terminal and again from us). A child
    killed by signal N gives 128+N; a child that fails after we forwarded signal N also gives 128+N
    (torchrun itself exits 1 when interrupted), so Ctrl+C is 130 and a scheduler's SIGTERM 143.
    """
    from minitrain.train.faults import wait_forwarding_signals

    env = dict(os.environ if env is None else env)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")  # seconds the ranks get to save after a signal
    code, _ = wait_forwarding_signals(
        lambda: subprocess.Popen(list(cmd), env=env, start_new_session=True),  # starts with signals blocked
        notify=lambda m: print(f"minitrain: {m}", file=sys.stderr, flush=True),
    )
    return code


def run_training(config: TrainConfig, inputs: Inputs | None = None) -> int:
    """Check, write training_params.json, and train: torchrun in a child, or in-process under a launcher.

    `inputs`: what `check_inputs(config)` returned, when the caller ran the cheap checks already.
    """
    launched = in_launched_env()
    info = preflight(config, inputs)
    if launched:
        from minitrain.train.dist import ranks_from_env
        from minitrain.train.worker import run

        rank, _, world, _ = ranks_from_env(os.environ)
        if rank == 0:
            write_training_params(config, world_size=world, data=info.params())
        state = run(config, tokenizer_source=info.tokenizer_source)
        return signal_exit_code(state.stop_signal) if state.stop_signal else 0
    config = fit_to_gpus(config)
    write_training_params(config, world_size=config.world_size(), data=info.params())
    return run_command(torchrun_command(config), env=torchrun_env(config.nproc))


def torchrun_env(nproc: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment torchrun runs in: the user's, with OMP_NUM_THREADS set when the user left it unset.

    Then it is this machine's usable cores shared by the local ranks. torchrun's own default is 1 thread
    per rank, announced in a banner of asterisks on every multi-process run.
    """
    env = dict(os.environ if environ is None else environ)
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // max(1, nproc)))
    return env


def torchrun_main(argv: Sequence[str]) -> int:
    """torchrun (`torch.distributed.run`) with its failures as one line each instead of a traceback.

    A failing rank has already printed its own one-line error; torchrun then raises `ChildFailedError`
    (or `SignalException` when it was itself signalled), which would end in a traceback of torchrun's
    internals. Exit codes: 1 when a rank failed, 128+N after signal N.
    """
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from minitrain.train.faults import block_stop_signals_in_children

    if not sys.stderr.isatty():  # a log file: no "Sending process N closing signal" lines after our own
        _quiet_torchrun()
    block_stop_signals_in_children()  # each rank starts with them blocked; its entry point lets them in
    try:
        torchrun(list(argv))
    except ChildFailedError as err:
        for rank, failure in sorted(err.failures.items()):
            code = failure.exitcode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            print(f"minitrain: rank {rank} (pid {failure.pid}) {how}", file=sys.stderr, flush=True)
        return 1
    except SignalException as err:
        return signal_exit_code(int(err.sigval))
    return 0


def _quiet_torchrun() -> None:
    """Only errors from torchrun's own loggers (each has its level set from LOGLEVEL when it is created)."""
    import logging

    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.ERROR)


if __name__ == "__main__":  # a Ctrl+C before torchrun's handlers ends it quietly (start_quietly, above)
    sys.exit(torchrun_main(sys.argv[1:]))
