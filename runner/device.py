"""The device a process trains on, its numeric precision, and the seeds that make a run repeatable."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from runner.errors import ConfigError


def select_device(name: str) -> torch.device:
    """``auto`` takes CUDA, then MPS, then the CPU; an explicit device must exist.

    Raises:
        ConfigError: the device named is not here.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name} but MPS is not available here; use trainer.device=auto or cpu.")
    return device


def precision_settings(precision: str, device: torch.device) -> dict[str, Any]:
    """Loop settings for trainer.precision: the autocast dtype, and a GradScaler for float16.

    Raises:
        ConfigError: bf16 on a GPU without bfloat16.
    """
    precision = str(precision)
    if precision == "32":
        return {}
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("trainer.precision=bf16 but this GPU has no bfloat16; use trainer.precision=16-mixed.")
        return {"autocast_dtype": torch.bfloat16}
    return {"autocast_dtype": torch.float16, "scaler": torch.amp.GradScaler(device.type)}


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this to be reproducible; it must be set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
