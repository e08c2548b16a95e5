"""Where and how the arithmetic runs: device, memory format, precision, DDP.

CPU defaults follow measurements on this project's 2-core machine (the foundation issue reports
channels-last +13% for resnet18, +43% for efficientnet_lite0, bf16 autocast slower than fp32;
bench/cpu_compute_settings.py re-measures it on any machine).
On CUDA: channels-last and AMP (bf16 where supported, else fp16 with a grad scaler).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medxfer.config import TrainConfig
from medxfer.errors import MedxferError


@dataclass(frozen=True)
class Compute:
    device: torch.device
    channels_last: bool
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def use_grad_scaler(self) -> bool:
        return self.device.type == "cuda" and self.dtype == torch.float16


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedxferError(f"train.device={name} but CUDA is not available", "use train.device=cpu")
    return torch.device(name)


def resolve(cfg: TrainConfig) -> Compute:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(cfg.device, local_rank)
    if device.type == "cuda" and world > 1:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    channels_last = cfg.channels_last == "true" or cfg.channels_last == "auto"
    precision = cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype == torch.float16 and device.type == "cpu":
        raise MedxferError("train.precision=fp16 is for CUDA", "use bf16 or fp32 on the CPU")
    return Compute(device, channels_last, dtype, rank, world, local_rank)


def init_distributed(c: Compute) -> None:
    if c.world > 1 and not dist.is_initialized():
        backend = "nccl" if c.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)


def barrier(c: Compute) -> None:
    if c.world > 1 and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first(c: Compute) -> Iterator[None]:
    """Let rank 0 do a thing first (build the image cache), then the others."""
    if not c.is_main:
        barrier(c)
    yield
    if c.is_main:
        barrier(c)
