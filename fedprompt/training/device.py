"""One accelerate ``Accelerator`` per process: the device and precision every client uses."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from fedprompt.config import ConfigError, RuntimeConfig


def make_accelerator(runtime: RuntimeConfig) -> Accelerator:
    """The accelerator for a run's runtime settings, failing early on a device this machine lacks."""
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "runtime.device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'"
        )
    if runtime.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("runtime.device: 'mps' was asked for but MPS is not available; use 'auto' or 'cpu'")
    cpu = runtime.device == "cpu" or (runtime.device == "auto" and not torch.cuda.is_available())
    if cpu and runtime.mixed_precision == "fp16":
        raise ConfigError("runtime.mixed_precision: 'fp16' needs a GPU; use 'bf16' or 'no' on the CPU")
    # accelerate keeps process-wide state; a later run in the same process (a notebook, a test
    # session) with other settings starts it afresh instead of failing.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=runtime.mixed_precision)
