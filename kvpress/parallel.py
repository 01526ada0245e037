"""kvpress on several GPUs, inside the engines users already have (see docs/multigpu.md).

* accelerate's ``device_map`` (``from_pretrained(..., device_map="auto")``): layers spread over GPUs.
  Each cache layer lives on its model layer's device, and so does a mirror of the token bookkeeping
  (:class:`DeviceLedger`): per forward only the new tokens' ranks cross to each other device.
* transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``):
  each rank's attention holds a block of the heads. ``kvpress.patch`` reads the rank's heads
  (``ModelInfo.heads``) and cuts per-head configs to them (``methods.base.select_heads``); every
  rank patches its own model and holds the cache of its own heads, so ``kvpress.kv_cache_bytes``
  is the rank's share and :func:`total_kv_cache_bytes` the whole model's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers.cache_utils import Cache

from .adapters import HeadShard, describe
from .cache import AppendBuffer, ForwardTokens, TokenLedger, kv_cache_bytes


def tensor_parallel_args() -> dict:
    """``from_pretrained`` keyword arguments that load a model tensor parallel over every process of
    ``torchrun`` with the model's own plan: ``distributed_config=DistributedConfig(tp_plan="auto")``
    (transformers >= 5.17, where a bare ``tp_plan=`` is deprecated), else ``tp_plan="auto"``."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def head_shard(model: nn.Module) -> HeadShard:
    """The heads this process computes in every layer (all of them unless ``model`` is tensor parallel)."""
    return describe(model).heads


def total_kv_cache_bytes(cache: Cache, group=None) -> int:
    """Bytes of device memory held by ``cache`` summed over the ranks of ``group`` (default: every
    process), for a tensor-parallel model whose ranks each hold the cache of their heads. Every rank
    of the group must call it (an all-reduce). Without torch.distributed, :func:`kv_cache_bytes`."""
    local = kv_cache_bytes(cache)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    backend = str(dist.get_backend(group))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    total = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return int(total.item())


class DeviceLedger(TokenLedger):
    """A :class:`~kvpress.cache.TokenLedger` that keeps, on every other device its layers run on
    (``device_map``), a mirror of its rank buffers, appended with each forward's new ranks: a
    decode step sends ``[B, 1]`` ranks to each device instead of the ranks of every token seen.

    A mirror is copied whole again only when its buffer changed other than by appending (a window
    compacted every ``slack`` steps: ``[B, sink + recent]`` ranks; a batch reindexed; a forward
    that failed half-way). Static decode steps (``kvpress.graph``, one device) keep the base path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mirrors: dict = {}  # device -> {None (every token) or Window: AppendBuffer of ranks there}
        self._kept_on: dict = {}  # (window, device) -> the last compaction's kept positions there
        self.mirror_copies = 0  # whole-buffer copies made (the per-step appends are not counted)

    def begin(self, *args, **kwargs) -> None:
        super().begin(*args, **kwargs)
        self._kept_on = {}
        if self.recovering:
            self._mirrors = {}

    def end(self) -> None:
        super().end()
        self._kept_on = {}

    def select_batch(self, index: torch.Tensor) -> None:
        super().select_batch(index)
        self._mirrors = {}

    def current(self, device=None) -> ForwardTokens:
        step = self.step
        if step is None or device is None or step.lengths is not None or step.new_rank.device == torch.device(device):
            return super().current(device)
        device = torch.device(device)
        if device not in self._on_device:
            move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
            new_rank = move(step.new_rank)
            mirror = self._mirrors.setdefault(device, {})
            here = ForwardTokens(new_rank, positions=move(step.positions))
            if step.all_rank is not None:
                here.all_rank = self._mirrored(mirror, None, step.all_rank, new_rank)
            for window, ranks in step.window_rank.items():
                here.window_rank[window] = self._mirrored(mirror, window, ranks, new_rank)
            self._on_device[device] = here
        return self._on_device[device]

    def _mirrored(self, mirror: dict, key, ranks: torch.Tensor, new_rank: torch.Tensor) -> torch.Tensor:
        """``ranks [B, T + n]`` (this forward's ``n`` new ones last) on ``new_rank``'s device."""
        old = ranks.shape[1] - new_rank.shape[1]
        buffer = mirror.get(key)
        if buffer is None or buffer.length != old:  # first use, or the buffer changed other than by appends
            buffer = mirror[key] = AppendBuffer(dim=1)
            if old:
                buffer.replace(ranks[:, :old].to(new_rank.device))
                self.mirror_copies += 1
        return buffer.append(new_rank)

    def compaction(self, window, device):
        kept = self._compaction.get(window)
        if kept is None or kept.device == torch.device(device):
            return kept
        key = (window, torch.device(device))
        if key not in self._kept_on:
            self._kept_on[key] = kept.to(device)
        return self._kept_on[key]

    def tensors(self) -> list[torch.Tensor]:
        mirrored = [b.storage for m in self._mirrors.values() for b in m.values() if b.storage is not None]
        return super().tensors() + mirrored
