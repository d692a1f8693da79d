"""Copy, save and load model tensors whatever their sharding: plain, DeepSpeed ZeRO-3 or FSDP2.

The fixed PACS reference is a second copy of the policy. Under ZeRO-3 and FSDP2 both models are sharded across
processes, so neither ``load_state_dict`` nor ``Tensor.copy_`` sees whole tensors. These helpers work one tensor
at a time (at most one whole tensor exists at once, two for a ZeRO-3 copy: its source and destination), and
every process must call them with the same tensors in the same order (they run collectives):

- a ZeRO-3 parameter (it has ``ds_id``) is gathered with ``deepspeed.zero.GatheredParameters``; when it is the
  destination, every process writes the new value and DeepSpeed re-partitions it on exit;
- an FSDP2 parameter is a ``DTensor``: two with the same mesh and placements are copied shard to shard, with no
  communication; otherwise the source is made whole (``full_tensor``) and each process keeps its shard
  (``distribute_tensor`` with ``src_data_rank=None``, no communication).

FSDP1 (flat parameters) is not handled: transformers deprecates it in favour of FSDP2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor, distribute_tensor = (), None


def is_zero3(t: torch.Tensor) -> bool:
    return hasattr(t, "ds_id")


def is_dtensor(t: torch.Tensor) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape (a ZeRO-3 parameter's own shape is that of its empty placeholder)."""
    return tuple(t.ds_shape) if is_zero3(t) else tuple(t.shape)


@contextlib.contextmanager
def _gathered(tensors: list[torch.Tensor], modifier_rank: int | None):
    """Gather the ZeRO-3 parameters among ``tensors`` (a no-op without any). With ``modifier_rank=0`` DeepSpeed
    re-partitions them on exit from the values of rank 0 of their process group; every process writes the same
    values, so which process that is does not matter."""
    zero = [t for t in tensors if is_zero3(t)]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=modifier_rank):
        yield


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a plain or DTensor tensor (a collective for a sharded DTensor); ZeRO-3 must be gathered."""
    return t.full_tensor() if is_dtensor(t) else t.data


def _assign(dst: torch.Tensor, whole: torch.Tensor) -> None:
    """dst <- whole, where ``whole`` is the full value, the same on every process."""
    if is_dtensor(dst):
        whole = whole.to(dst.device, dst.dtype)
        try:  # each process keeps its own shard of its own copy: no communication
            shard = distribute_tensor(whole, dst.device_mesh, dst.placements, src_data_rank=None)
        except TypeError:  # torch < 2.7: scattered from rank 0 (which holds the same values)
            shard = distribute_tensor(whole, dst.device_mesh, dst.placements)
        dst.to_local().copy_(shard.to_local())
    else:
        dst.data.copy_(whole)


@torch.no_grad()
def copy_tensors(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``dst <- src`` for every ``(src, dst)`` pair, each tensor plain, ZeRO-3 or DTensor. All processes call it."""
    for src, dst in pairs:
        if _shape(src) != _shape(dst):
            raise ValueError(f"cannot copy a tensor of shape {_shape(src)} into one of {_shape(dst)}")
        if is_zero3(src) or is_zero3(dst):
            # the source gathered read-only (no re-partitioning of it), the destination written by every process
            with _gathered([src], modifier_rank=None), _gathered([dst], modifier_rank=0):
                dst.data.copy_(src.data)
        elif (
            is_dtensor(src)
            and is_dtensor(dst)
            and src.device_mesh == dst.device_mesh
            and src.placements == dst.placements
        ):
            dst.to_local().copy_(src.to_local())  # same sharding: shard to shard
        else:
            _assign(dst, _whole(src))


def copy_module(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every entry of ``src``'s state dict, and its non-persistent buffers, into ``dst`` (same architecture,
    any sharding of either)."""
    s, d = src.state_dict(keep_vars=True), dst.state_dict(keep_vars=True)
    if list(s) != list(d):
        missing, extra = sorted(set(s) - set(d)), sorted(set(d) - set(s))
        raise ValueError(
            f"the two models differ: only in the source {missing[:5]}, only in the target {extra[:5]}"
        )
    copy_tensors((s[k], d[k]) for k in s)
    copy_buffers(src, dst)


# wrappers that change module names but not state-dict keys (activation checkpointing, torch.compile)
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _non_persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    keys = set(module.state_dict(keep_vars=True))
    out = {}
    for name, b in module.named_buffers():
        clean = name
        for prefix in _WRAPPER_PREFIXES:
            clean = clean.replace(prefix, "")
        if clean not in keys:
            out[clean] = b
    return out


@torch.no_grad()
def copy_buffers(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy the buffers outside the state dict (rotary frequencies, ...), with their dtype. They are never sharded
    and not saved in checkpoints, so a reference built empty gets them from the policy. No collective."""
    s, d = _non_persistent_buffers(src), _non_persistent_buffers(dst)
    if set(s) != set(d):
        raise ValueError(
            f"the two models' buffers differ: only in the source {sorted(set(s) - set(d))[:5]}, "
            f"only in the target {sorted(set(d) - set(s))[:5]}"
        )
    for name, b in s.items():
        d[name].data = b.data.to(d[name].device, copy=True)


@torch.no_grad()
def full_state_dict(
    module: torch.nn.Module, keep: Callable[[str], bool] = lambda name: True
) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of ``module``'s state dict (names for which ``keep`` is true), on process 0; the other
    processes get an empty dict. All processes call it."""
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if not keep(name):
            continue
        with _gathered([t], modifier_rank=None):
            whole = _whole(t)
            if _rank() == 0:
                out[name] = whole.detach().to("cpu", copy=True)
    return out


@torch.no_grad()
def load_full_state_dict(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], strict: bool = True
) -> list[str]:
    """Write whole tensors (every process passes the same ``weights``) into ``module``, whatever its sharding.

    Returns the names of ``module``'s entries absent from ``weights``; with ``strict``, any absent or
    unexpected name is an error."""
    targets = module.state_dict(keep_vars=True)
    missing = [k for k in targets if k not in weights]
    unexpected = [k for k in weights if k not in targets]
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in targets.items():
        if name not in weights:
            continue
        w = weights[name]
        if tuple(w.shape) != _shape(t):
            raise ValueError(f"{name}: the saved tensor has shape {tuple(w.shape)}, the model's {_shape(t)}")
        if is_zero3(t):
            with _gathered([t], modifier_rank=0):
                t.data.copy_(w)
        else:
            _assign(t, w)
    return missing
