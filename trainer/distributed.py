"""Ranks, devices, and the one function that turns a ds_configs/*.json file into an engine.

Works the same in a single process (`lastmile sft ...`), under `deepspeed --num_gpus N
trainer/main.py ...`, under `torchrun --nproc_per_node N`, and under `srun`: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from lastmile.config import BatchPlan, OptimSettings, plan_batches
from lastmile.config import read_ds_config as load_ds_config  # distributed.load_ds_config, as callers know it
from lastmile.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _from_slurm_env() -> None:
    """`srun` without a launcher sets SLURM_PROCID etc.; map them to the torch variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def setup() -> DistInfo:
    """Initialize torch.distributed through DeepSpeed (idempotent) and pick the device."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _from_slurm_env()
    if "RANK" not in os.environ:  # a plain single process: DeepSpeed wants the rendezvous variables
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    import deepspeed

    from lastmile.preflight import use_environment_build_tools

    use_environment_build_tools()  # where and how `make install` built DeepSpeed's CPU op: not built again
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(value: float | int) -> float:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t.item())


def all_reduce_max(value: float) -> float:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- ds config


def fill_ds_config(raw: dict[str, Any], plan: BatchPlan, *, max_grad_norm: float, hidden_size: int,
                   bf16: bool = False) -> dict[str, Any]:
    """Replace every "auto" with a value derived from our config; refuse contradictions.

    Precision is ours: `bf16` (from `precision` and the device: `use_bf16`) turns on DeepSpeed's bf16,
    so a trained model keeps bf16 weights and gradients with fp32 master weights and AdamW moments in
    its optimizer, and a model loaded with this config loads in bf16 (`models.weights_dtype`); the
    forward passes also run under `autocast`. fp16 stays off. A JSON that turns either on itself is
    refused: the `precision` setting decides.
    """
    ds = copy.deepcopy(raw)
    wanted = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": max_grad_norm,
    }
    problems = []
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif current != value:
            problems.append(f"{key} ({current}) in the DeepSpeed JSON contradicts our config ({value}). Set it to \"auto\".")
    for key in ("fp16", "bf16"):
        if ds.get(key, {}).get("enabled") is True:
            problems.append(f"{key}.enabled (true) in the DeepSpeed JSON: lastmile handles precision with autocast. Use precision=bf16 and set it to \"auto\".")
        ds[key] = {"enabled": bf16 and key == "bf16"}
    zero = ds.setdefault("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if problems:
        raise ConfigError("DeepSpeed config problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _register_external(module: torch.nn.Module, ds: dict[str, Any]) -> None:
    if zero_stage(ds) == 3 and hasattr(module, "external_parameters"):
        import deepspeed

        for p in module.external_parameters():
            deepspeed.zero.register_external_parameter(module, p)


_ENGINES: list = []  # weak references to every engine this process built, for release_engines()


def _registered(engine):
    import weakref

    _ENGINES.append(weakref.ref(engine))
    return engine


def release_engines() -> int:
    """Destroy every DeepSpeed engine this process built (DeepSpeedEngine.destroy: its gradient hooks,
    which the autograd graph holds from C++, keep the engine, its model and its optimizer state alive
    after the last Python reference is gone). The pipeline calls it after each stage: without it every
    finished stage's model states stayed in memory (make demo's PPO peaked at 17.0 GiB instead of
    10.4). Returns how many were destroyed."""
    n = 0
    while _ENGINES:
        engine = _ENGINES.pop()()
        if engine is not None:
            engine.destroy()
            n += 1
    return n


def build_engine(module: torch.nn.Module, ds: dict[str, Any], optim: OptimSettings, *, total_steps: int):
    """deepspeed.initialize with our AdamW (compiles nothing) and LR schedule; returns the engine."""
    import deepspeed

    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:  # a ZeRO-3 partition is flat: its real shape is ds_shape
            (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 or "norm" in name else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.schedule, optim.warmup_steps, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    _register_external(module, ds)
    return _registered(engine)


def ds_config_for(ds_config: str, plan: BatchPlan, optim: OptimSettings, *, hidden_size: int,
                  bf16: bool = False) -> dict[str, Any]:
    """The filled DeepSpeed dict for a trained model; build it before loading the model so that a
    ZeRO-3 model is created partitioned (`models.partitioned_loading`). `bf16`: `use_bf16(precision, device)`."""
    return fill_ds_config(load_ds_config(ds_config), plan, max_grad_norm=optim.max_grad_norm, hidden_size=hidden_size,
                          bf16=bf16)


def inference_ds_config(ds_config: str, world_size: int, *, hidden_size: int, bf16: bool = False) -> dict[str, Any]:
    """The filled DeepSpeed dict for a model that only generates or scores (nothing trains, so no
    optimizer settings): one sequence per rank for DeepSpeed's batch arithmetic, no gradient clipping."""
    raw = load_ds_config(ds_config)
    clip = raw.get("gradient_clipping")  # irrelevant without training: take the JSON's own value, if any
    return fill_ds_config(raw, plan_batches(world_size, 1, world_size), hidden_size=hidden_size,
                          max_grad_norm=clip if isinstance(clip, (int, float)) else 0.0, bf16=bf16)


def inference_engine(module: torch.nn.Module, ds: dict[str, Any], device: torch.device):
    """A frozen model (reference, reward model) for forward passes only: under ZeRO-3 a DeepSpeed
    engine without optimizer, parameters partitioned across ranks; otherwise the plain module on the
    device (ZeRO-1/2 partition only optimizer state, which a frozen model does not have)."""
    for p in module.parameters():
        p.requires_grad_(False)
    if zero_stage(ds) != 3:
        return module.to(device).eval()
    import deepspeed

    ds_eval = copy.deepcopy(ds)
    ds_eval["zero_optimization"] = {k: v for k, v in ds["zero_optimization"].items()
                                    if not k.startswith("offload_optimizer")}
    ds_eval.pop("gradient_clipping", None)
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_eval)
    _register_external(module, ds_eval)
    engine.eval()
    return _registered(engine)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def consolidated_state_dict(engine, ds: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (None elsewhere); a collective under ZeRO-3."""
    if zero_stage(ds) == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if torch.distributed.get_rank() == 0 else None
    return sd


def bf16_enabled(ds: dict[str, Any] | None) -> bool:
    """Whether a filled DeepSpeed dict keeps its model's weights in bf16 (fill_ds_config's `bf16`)."""
    return bool(ds and ds.get("bf16", {}).get("enabled") is True)


def use_bf16(precision: str, device: torch.device) -> bool:
    """`fp32`: never; on CUDA: where the device supports bf16; on a CPU: `bf16` always, `auto` where
    the CPU has oneDNN's bf16 support (AVX-512 or newer). Without it bf16 is emulated: on an AVX2-only
    CPU (2026-12-06, SmolLM2-135M, 2x256 tokens, 2 cores) a forward and backward took 135 s under bf16
    autocast against 11 s in fp32, while on the machine measured on 2026-11-24 bf16 was faster (185 vs
    121 tokens/s)."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return precision == "bf16" or cpu_has_native_bf16()


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision, `bf16` or `fp32`, that `precision` (`auto`, `bf16`, `fp32`) gives on `device`."""
    return "bf16" if use_bf16(precision, device) else "fp32"


def shared_precision(precision: str, device: torch.device) -> str:
    """`resolve_precision` as rank 0 resolves it, on every rank (collective): ranks on different CPUs agree."""
    return gather_objects(resolve_precision(precision, device))[0]


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def autocast(precision: str, device: torch.device):
    """Mixed precision for forward passes; weights and optimizer state stay fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16(precision, device))
