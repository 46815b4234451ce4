"""Where and how the loop runs: device and dtype (with the reason printed), determinism, torchrun/DDP
process groups, peak FLOPs for MFU, and SIGINT/SIGTERM handling.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lm2cli.errors import Lm2Error

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; an unknown accelerator or a CPU reports no MFU rather than a
# made-up one.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
    "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12,
    "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


@dataclass
class Runtime:
    device: torch.device
    dtype_name: str  # "fp32" or "bf16"
    reason: str  # why this device and dtype were chosen, printed at start
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    backend: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        if self.dtype_name == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or `op`) of `t` over all processes, returned on `t`'s device (NCCL needs CUDA tensors)."""
        if not self.distributed:
            return t
        on_device = t.to(self.device)
        dist.all_reduce(on_device, op=op or dist.ReduceOp.SUM)
        return on_device.to(t.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)  # process-to-process only; nothing read from disk is unpickled
        return out

    def peak_flops(self) -> float | None:
        if self.device.type != "cuda" or self.dtype_name != "bf16":
            return None
        name = torch.cuda.get_device_name(self.device)
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
        return None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup_runtime(train_cfg) -> Runtime:
    """Pick the device and compute dtype from the recipe and start the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if train_cfg.device == "cuda" and not cuda:
        raise Lm2Error("train.device = \"cuda\" but no CUDA device is available; use \"auto\" or \"cpu\"")
    use_cuda = cuda and train_cfg.device != "cpu"
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        why = f"device {torch.cuda.get_device_name(device)} (train.device = {train_cfg.device})"
    else:
        device = torch.device("cpu")
        why = "device cpu" + (" (no CUDA available)" if train_cfg.device == "auto" else " (train.device = cpu)")
    if train_cfg.dtype == "auto":
        dtype = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "fp32"
        why += (", bf16 autocast (CUDA with bf16 support)" if dtype == "bf16"
                else ", fp32 (train.dtype = auto: bf16 autocast is for CUDA only)")
    else:
        dtype = train_cfg.dtype
        why += f", {dtype} (train.dtype = {dtype})"
    backend = None
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
        why += f", {world} processes ({backend})"
    rt = Runtime(device, dtype, why, rank, local_rank, world, backend)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores: same speed class as bf16
        torch.backends.cudnn.allow_tf32 = True
    return rt


def set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible reductions; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.matmul.allow_tf32 = False


@contextlib.contextmanager
def distributed_run(train_cfg):
    """The runtime of one training command; its process group ends with it (see shutdown)."""
    rt = setup_runtime(train_cfg)
    completed = False
    try:
        yield rt
        completed = True
    finally:
        shutdown(rt, completed)


def shutdown(rt: Runtime, completed: bool) -> None:
    """End the process group. FSDP's hooks hold the group in reference cycles: unless they are collected first,
    the group outlives destroy_process_group and its gloo threads abort the process at interpreter exit
    ("terminate called without an active exception", one run in ten under load). After a completed run the
    barrier lets every rank finish its last collective first; after an error it is skipped, since a peer may
    be gone and the barrier would hang."""
    if not (rt.distributed and dist.is_initialized()):
        return
    gc.collect()
    if completed:
        dist.barrier()
    dist.destroy_process_group()


class StopRequest:
    """SIGINT/SIGTERM during training: note it, let the current step finish, save, then stop.

    A second SIGINT falls through to Python's default (KeyboardInterrupt), for when saving itself hangs.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no graceful stop, nothing breaks
                pass

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class TrainingInterrupted(Lm2Error):
    """Stopped by a signal after saving; the message says how to resume. Exit code 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
