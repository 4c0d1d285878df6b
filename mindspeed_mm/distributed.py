"""Process-group and megatron model-parallel setup, for torchrun, SLURM, OpenMPI or a plain process.

The same calls run on CPU (gloo, with the device adaptor applied first) and on CUDA (nccl).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import random
import socket
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mindspeed_mm.device import apply_device_adaptor


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job. ``master_port`` None means: pick a free local port."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int | None
    launcher: str  # "torchrun", "openmpi", "slurm" or "single"


DEFAULT_MASTER_PORT = 29500


def parse_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    """Read rank, world size, local rank and master address from the launcher's variables.

    Checked in order: torchrun (RANK/WORLD_SIZE), OpenMPI (OMPI_COMM_WORLD_*; more specific than
    SLURM, whose variables are also set when mpirun runs inside an allocation), SLURM
    (SLURM_PROCID/SLURM_NTASKS). With none of them: a single process on a free local port.
    """
    def master(default_addr: str | None, launcher: str) -> tuple[str, int]:
        addr = env.get("MASTER_ADDR") or default_addr
        if not addr:
            raise ValueError(f"{launcher} launch with several processes: set MASTER_ADDR")
        return addr, int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))

    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        addr, port = master("127.0.0.1", "torchrun")
        return LaunchEnv(rank, world, int(env.get("LOCAL_RANK", 0)), addr, port, "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world))
        addr, port = master("127.0.0.1" if local_size == world else None, "OpenMPI")
        local_rank = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        return LaunchEnv(rank, world, local_rank, addr, port, "openmpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        addr, port = master(env.get("SLURM_LAUNCH_NODE_IPADDR"), "SLURM")
        return LaunchEnv(rank, world, int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", None, "single")


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_minutes: float = 10) -> LaunchEnv:
    """Apply the device adaptor, then create the default process group (once; later calls only
    return the launch info). Backend: nccl when CUDA is available, else gloo."""
    apply_device_adaptor()
    launch = parse_launch_env(os.environ)
    if dist.is_initialized():
        return launch
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if launch.master_port is None:
        launch = dataclasses.replace(launch, master_port=find_free_port())
    if launch.launcher in ("slurm", "openmpi"):
        # Only torchrun exports these, and some megatron/torch helpers read them. (Not for a single
        # process: a later init in the same process would then take them for a torchrun launch.)
        for key, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size),
                           ("LOCAL_RANK", launch.local_rank), ("MASTER_ADDR", launch.master_addr),
                           ("MASTER_PORT", launch.master_port)):
            os.environ.setdefault(key, str(value))
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank, world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes))
    return launch


def initialize_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None,
                              seed: int = 1234, embedding_pp_ranks: Sequence[int] = (), ep: int = 1,
                              etp: int | None = None) -> None:
    """Create megatron's TP/PP/CP/DP groups and its expert groups, and seed every generator as Megatron-LM does.

    ``ep``/``etp``: expert-parallel and expert-tensor-parallel sizes (`ParallelSizes.ep`/`.etp`; etp None is
    megatron's default, tp). megatron carves them out of each stage's tp*cp*dp ranks: no ranks are added.

    ``embedding_pp_ranks``: the pipeline ranks of megatron's embedding group, the ones holding a copy of tied
    embeddings (`LayoutPlan.tied_embedding_pp_ranks`); empty: megatron's default (the first and last rank),
    which nothing of ours uses then. Training needs the layout's, inference and conversion load every copy.

    Re-initializing tears the previous layout down first. The CPU generator gets ``seed + 100 *
    pp_rank`` (each stage initializes different layers); the tracked tensor-parallel RNG states come
    from megatron's ``model_parallel_cuda_manual_seed``.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: call init_distributed() first")
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel()
    embedding_ranks = None
    if embedding_pp_ranks:
        if not all(0 <= r < pp for r in embedding_pp_ranks):
            raise ValueError(f"embedding_pp_ranks {list(embedding_pp_ranks)}: pipeline ranks are 0..{pp - 1}")
        # megatron calls it with each pipeline group's global ranks, in pipeline order
        embedding_ranks = lambda ranks, *_: [ranks[r] for r in embedding_pp_ranks]  # noqa: E731
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp, get_embedding_ranks=embedding_ranks,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_model_parallel() -> None:
    """Tear down megatron's groups and RNG tracker, keeping the default process group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    parallel_state.destroy_model_parallel()
    mrandom.initialize_rng_tracker(force_reset=True)


def destroy_distributed() -> None:
    """destroy_model_parallel, then the default process group too."""
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
