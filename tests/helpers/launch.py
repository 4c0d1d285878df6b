"""Launch a worker script on several local ranks with torchrun, for multi-rank tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

# Launcher variables of an enclosing job would make the workers join the wrong group.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK",
                  "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def run_torchrun(script_path: str | os.PathLike, nproc: int, args: Sequence[str] = (),
                 timeout: float = 300, env: Mapping[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node N script args``.

    ``--standalone`` rendezvouses through a store on a port the OS picks, so parallel launches do
    not collide. Workers get one thread each (2-core machines) and the repository on PYTHONPATH.
    Raises AssertionError with the tail of stdout/stderr if it fails or runs past ``timeout``.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script_path), *map(str, args)]
    # NVTE_*: megatron's GPTModel exports its attention-backend choice into os.environ and asserts that it
    # agrees with the next model's; a model built in the test process must not decide for the workers.
    full_env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("NVTE_")}
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_REPO_ROOT), full_env.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in its own session; only its SIGTERM handler reaches them.
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        raise AssertionError(
            f"torchrun timed out after {timeout}s: {' '.join(cmd)}\n"
            f"--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun exited with {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}")
    return result


def run_converter_without_torch(*commands: Sequence[str], timeout: float = 300) -> None:
    """Run each `mm-convert` argument list in order in one fresh interpreter and check that torch was never
    imported there (hf_to_mm and resplit must not pay torch's import)."""
    code = ("import sys\nfrom mindspeed_mm.cli.mm_convert import main\n"
            + "".join(f"assert main({list(c)!r}) == 0\n" for c in commands)
            + "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       cwd=_REPO_ROOT)
    assert r.returncode == 0, _tail(r.stderr)
