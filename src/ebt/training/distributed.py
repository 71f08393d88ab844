"""torchrun integration: process group setup, rank helpers and reductions, DDP / FSDP2 wrapping.

Second-order gradients and data parallelism. The candidate gradient dE/dp is taken inside
`Objective.forward` (written out by hand with ordinary parameters, with
`autograd.grad(create_graph=True)` under FSDP2), so a wrapper sees one forward and one ordinary
backward of the full second-order loss:

- DDP (`train.parallel=ddp`): its gradient hooks fire on the parameters' final accumulation,
  which includes the grad-of-grad terms; tests compare it with one process on the same batch.
- FSDP2 (`train.parallel=fsdp`): `fully_shard` on every block and on the objective as the root.
  FSDP's own per-module hooks do not survive the inner `autograd.grad` (checked with torch
  2.13 on gloo): its end-of-backward callback fires when the inner call ends and reshards in
  the middle of the forward, the outer backward then reads freed parameter storage ("setStorage
  ... storage of size 0"), and with resharding switched off the block gradients are never
  reduce-scattered. The blocks are therefore called through methods that FSDP does not hook
  (`Block.context` / `Block.prediction`), the root pre-forward all-gathers every block, and all
  gradients are reduce-scattered by FSDP's end-of-backward callback, after every term has
  accumulated. Memory: parameters, gradients and optimizer state are sharded at rest; during a
  step the full parameters (and in backward the full gradients) are resident, so FSDP here
  saves about what ZeRO-2 saves, not what ZeRO-3 saves. Scalar parameters (alpha, the Langevin
  sigma) cannot be sharded: they stay replicated and `sync_replicated_grads` averages their
  gradients.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from ebt.errors import EbtError, machine_cause
from ebt.runtime import pick_device


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() created the process group (and train() tears it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str = "auto") -> DistributedContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    owns = world_size > 1 and not dist.is_initialized()
    if device.type == "cuda" and world_size > 1:
        torch.cuda.set_device(device)
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedContext(rank, world_size, local_rank, device, owns)


def is_main_process() -> bool:
    """Rank 0 of the process group, or of torchrun's environment when no group is active."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of numbers over ranks in one collective (identity when not distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    keys = sorted(values)
    numbers = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    total = all_reduce_sum(numbers)
    return dict(zip(keys, (total / dist.get_world_size()).tolist(), strict=True))


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable, CPU tensors) as a list on rank 0; None on other ranks."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_from_main(value: Any) -> Any:
    """Rank 0's picklable `value` on every rank (identity when not distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _shareable(error: Exception) -> Exception | None:
    """What the other ranks raise for rank 0's `error`: the same line (an ebt error, a
    machine OSError), or one naming rank 0's failure (its traceback stays on rank 0)."""
    if isinstance(error, OSError) and machine_cause(error) is not None:
        return OSError(error.errno, error.strerror, error.filename)
    if isinstance(error, EbtError) and type(error).__init__ is EbtError.__init__:
        return type(error)(str(error))
    return EbtError(f"rank 0 stopped: {type(error).__name__}: {error}")


def on_main(action: Callable[[], None]) -> None:
    """Run `action` (a write: a checkpoint, the run's files) on rank 0 alone and share its
    outcome; every rank must call this. When it fails, every rank raises (rank 0 its own error,
    the others the same one line, see _shareable), so no rank is left waiting at a collective
    for a rank that stopped, and every rank leaves its process group the ordinary way."""
    failure = None
    if is_main_process():
        try:
            action()
        except Exception as error:
            _broadcast_from_main(_shareable(error))
            raise
    failure = _broadcast_from_main(failure)
    if failure is not None:
        raise failure


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), the other ranks after it (read it)."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    if not main:
        barrier()
    yield
    if main:
        barrier()


_left_group = False  # this process destroyed a process group: see exit_process


def teardown() -> None:
    global _left_group
    if dist.is_initialized():
        dist.destroy_process_group()
        _left_group = True


def exit_process(code: int) -> NoReturn:
    """End a process (`python -m ebt`, a spawned test rank) with `code`: `sys.exit`, or, when
    the process left a gloo process group, `os._exit` after flushing stdout and stderr.

    Why: `destroy_process_group()` does not stop gloo. DDP and FSDP2 keep references to the
    group, so ProcessGroupGloo and its worker threads outlive it (torch 2.13: 3 threads remain,
    even after the wrappers are collected). A worker drops its reference to a collective it ran
    after the waiting rank has moved on. A collective launched inside backward (DDP's gradient
    all-reduce, FSDP's reduce-scatter; a later barrier holds the works in flight) captured the
    thread-local state of backward, which owns a Python object (the `contextvars` context that
    torch.autograd stashes there), so that release takes the GIL. If the main thread has begun
    interpreter finalization by then, Python ends the thread with `pthread_exit`; its forced
    unwind runs through the noexcept work destructor and libstdc++ calls std::terminate
    ('terminate called without an active exception', SIGABRT; a core dump shows runLoop ->
    ~AsyncBarrierWork -> ~AsyncAllreduceWork -> ~ThreadLocalState -> decref -> take_gil ->
    pthread_exit -> terminate). The window is short: a rank of a finished torchrun run, or a
    test rank, aborted now and then on a loaded machine. Leaving without finalization closes it:
    no thread can be caught taking the GIL, and the kernel ends gloo's threads with the process.
    """
    if not _left_group:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wrap_objective(objective: nn.Module, context: DistributedContext, parallel: str) -> nn.Module:
    """The objective as trained: itself (one process), DDP, or sharded in place by FSDP2."""
    if not context.enabled:
        return objective
    if parallel == "fsdp":
        return shard_objective(objective)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(objective, device_ids=device_ids)


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _unshard_all(modules: list[nn.Module], *_: Any) -> None:
    handles = [module.unshard(async_op=True) for module in modules]
    for handle in handles:
        if handle is not None:
            handle.wait()


def shard_objective(objective: nn.Module) -> nn.Module:
    """FSDP2 on the objective's model: `fully_shard` per block, the objective as the root.

    The root's pre-forward all-gathers every block (see the module docstring for why FSDP's
    per-block hooks are not used); FSDP's end-of-backward callback reduce-scatters and reshards.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = list(getattr(objective.model, "blocks", []))
    for block in blocks:
        fully_shard(block)
    scalars = {p for p in objective.parameters() if p.dim() == 0}
    fully_shard(objective, ignored_params=scalars or None)
    objective.register_forward_pre_hook(lambda module, args: _unshard_all(blocks))
    return objective


def is_sharded(module: nn.Module) -> bool:
    """True when FSDP2 manages any of the module's parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """All FSDP2 parameters of `module` all-gathered for the block (evaluation), then resharded.

    Inside, forwards run no collective, so ranks may run different numbers of batches.
    """
    modules = _fsdp_modules(module)
    _unshard_all(modules)
    try:
        yield
    finally:
        for fsdp_module in modules:
            fsdp_module.reshard()


def no_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() for gradient-accumulation micro-steps that are not the last."""
    if sync or not isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def sync_replicated_grads(module: nn.Module) -> None:
    """Average over ranks the gradients of parameters that FSDP2 left replicated (scalars)."""
    if not (dist.is_initialized() and is_sharded(module)):
        return
    from torch.distributed.tensor import DTensor

    for param in module.parameters():
        if param.grad is not None and not isinstance(param, DTensor):
            all_reduce_sum(param.grad).div_(dist.get_world_size())


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that also takes a mix of FSDP2-sharded and replicated gradients;
    max_norm 0 only measures the norm (train.grad_clip=0: no clipping)."""
    from torch.distributed.tensor import DTensor

    max_norm = max_norm if max_norm > 0 else float("inf")
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    if not any(isinstance(g, DTensor) for g in grads):
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    squares = torch.stack([g.detach().float().square().sum() for g in sharded]).sum()
    all_reduce_sum(squares)  # disjoint shards: the sum over ranks is the full sum of squares
    for grad in replicated:
        squares = squares + grad.detach().float().square().sum()
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in sharded + replicated:
        grad.mul_(scale.to(grad.dtype))
    return norm


def _state_options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU state dict of an FSDP2 model on rank 0; {} on other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state dict (keyed by parameter names) on rank 0; {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_options(cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes it) into a possibly sharded model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_state_options())


def _names_by_index(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order of the optimizer's integer ids."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _keyed_by_name(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """An `optimizer.state_dict()` (integer ids) re-keyed by parameter names."""
    names = _names_by_index(model, optimizer)
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a saved optimizer state: integer-id format (one process / DDP) or name-keyed (FSDP).

    Either format loads into either kind of run, so a run can move between DDP and FSDP.
    """
    groups = state.get("param_groups") or [{"params": []}]
    by_name = any(isinstance(p, str) for g in groups for p in g["params"])
    if not by_name and not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = state if by_name else _keyed_by_name(state, model, optimizer)
    set_optimizer_state_dict(model, optimizer, state, options=_state_options())
