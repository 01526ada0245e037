"""kvpress on several GPUs, inside the engines users already have (see docs/multigpu.md).

* accelerate's ``device_map`` (``from_pretrained(..., device_map="auto")``): layers spread over GPUs.
  Each cache layer lives on its model layer's device, and the token bookkeeping is copied once per
  forward to each device that needs it; nothing else is needed.
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
from .cache import kv_cache_bytes


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
