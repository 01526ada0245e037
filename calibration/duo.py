"""DuoAttention gate calibration (Xiao et al., 2024, arXiv 2410.10819, section 3.2), on one GPU.

Optimisation-based identification: one gate alpha per (layer, KV head), initialised to 1 and clamped
to [0, 1]; the model's weights are frozen. Each head's attention output becomes
``alpha * full + (1 - alpha) * streaming``, where ``full`` is the frozen teacher's output (computed
once per sample without gradients and reused) and ``streaming`` the head's own sink + recent
attention. The loss is the MSE between the teacher's and the gated model's final hidden states over
the supervised answer span, plus ``reg * mean(|alpha|)``.

What makes long contexts fit: the gates are the only parameters; the full-attention term needs no
backward pass (teacher, no grad); the streaming term is computed block by block at linear cost;
decoder layers are recomputed in the backward pass (activation checkpointing); no logits are formed.

The fast alternative, ``attention_mass_gates``, needs no training: a head's gate is the share of
attention mass that a sink + recent window would drop on the answer tokens of calibration samples.
(On the project's test model it ranks the heads badly; see the README.)
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpress.adapters import describe
from kvpress.api import attention_override
from kvpress.configfile import atomic_write
from kvpress.kernels.reference import rank_mask
from kvpress.methods.duo import DuoConfig

from .data import PasskeyData


@dataclass(frozen=True)
class DuoTraining:
    """Optimisation settings; defaults are the reference's."""

    steps: int = 2000
    lr: float = 0.02
    reg: float = 0.05  # lambda of the L1 term on the gates
    sink: int = 128  # streaming window used while training (tokens)
    recent: int = 256
    warmup: float = 0.2  # fraction of steps with linear warm-up
    decay: float = 0.2  # fraction of final steps with linear decay to 0.1x
    checkpoint_every: int = 50  # steps between resumable checkpoints


def streaming_attention(q, k, v, sink: int, recent: int, scale: float) -> torch.Tensor:
    """Causal sink + recent-window attention of one unpadded sequence batch, at linear cost.

    ``q [B, H, L, D]``, ``k``/``v [B, Hkv, L, D]``; query ``i`` sees keys ``j <= i`` with ``i - j <
    recent`` or ``j < sink``. Queries go in blocks of ``recent``: block ``n`` needs only blocks
    ``n - 1`` and ``n`` plus the sinks, so each block attends ``sink + 2 * recent`` keys at most.
    """
    batch, heads, length, dim = q.shape
    block = recent
    blocks = math.ceil(length / block)
    pad = blocks * block - length
    q = F.pad(q, (0, 0, 0, pad))
    windows = []
    for x in (k, v):  # one empty block in front, so block n's window is [n - 1, n]
        x = F.pad(x, (0, 0, block, pad)).unfold(2, 2 * block, block)  # [B, Hkv, n, D, 2b]
        windows.append(x.permute(0, 1, 2, 4, 3))
    num_sinks = min(sink, length)
    sink_k = k[:, :, None, :num_sinks].expand(-1, -1, blocks, -1, -1)
    sink_v = v[:, :, None, :num_sinks].expand(-1, -1, blocks, -1, -1)
    keys = torch.cat([sink_k, windows[0]], dim=3).transpose(1, 2).flatten(0, 1)  # [B*n, Hkv, S+2b, D]
    values = torch.cat([sink_v, windows[1]], dim=3).transpose(1, 2).flatten(0, 1)

    device = q.device
    q_pos = torch.arange(blocks * block, device=device).view(blocks, block)
    start = (torch.arange(blocks, device=device) - 1)[:, None] * block
    window_pos = start + torch.arange(2 * block, device=device)  # block n - 1's first key is at start
    in_window = rank_mask(q_pos, window_pos.clamp_min(-1), sink, recent)[:, 0]  # [n, b, 2b]
    from_sink = torch.arange(num_sinks, device=device) < start  # sinks the window does not already hold
    allowed = torch.cat([from_sink[:, None, :].expand(-1, block, -1), in_window], dim=2)  # [n, b, S+2b]
    allowed = allowed[None].expand(batch, -1, -1, -1).flatten(0, 1)[:, None]

    queries = q.view(batch, heads, blocks, block, dim).transpose(1, 2).flatten(0, 1)  # [B*n, H, b, D]
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=allowed, scale=scale, enable_gqa=heads != k.shape[1]
    )
    out = out.view(batch, blocks, heads, block, dim).transpose(1, 2).reshape(batch, heads, -1, dim)
    return out[:, :, :length]


def causal_attention(q, k, v, scale: float, window: int | None = None) -> torch.Tensor:
    """Dense causal attention of an unpadded batch (the teacher), optionally with a sliding window."""
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    from kvpress import kernels

    rank = torch.arange(k.shape[2], device=q.device, dtype=torch.int32).expand(q.shape[0], -1)
    return kernels.rank_attention(q, k, v, rank[:, -q.shape[2]:], rank, scale, window=window)


class Teacher:
    """Frozen full attention; keeps every layer's output for the student."""

    def __init__(self):
        self.outputs: dict[int, torch.Tensor] = {}

    def attention(self, module, query, key, value, attention_mask, scaling, sliding_window=None, **kwargs):
        out = causal_attention(query, key, value, scaling, sliding_window)
        self.outputs[module.layer_idx] = out.detach()
        return out.transpose(1, 2), None


class GatedStudent:
    """Per head: ``alpha * teacher output + (1 - alpha) * own streaming attention``."""

    def __init__(self, gates: torch.Tensor, teacher: Teacher, sink: int, recent: int):
        self.gates, self.teacher, self.sink, self.recent = gates, teacher, sink, recent

    def attention(self, module, query, key, value, attention_mask, scaling, **kwargs):
        streaming = streaming_attention(query, key, value, self.sink, self.recent, scaling)
        alpha = self.gates[module.layer_idx].repeat_interleave(module.num_key_value_groups)
        alpha = alpha.to(query.dtype)[None, :, None, None]
        out = alpha * self.teacher.outputs[module.layer_idx] + (1 - alpha) * streaming
        return out.transpose(1, 2), None


@contextmanager
def frozen_with_checkpointing(model):
    """Weights frozen, decoder layers recomputed in backward; everything restored afterwards."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.18
        was_checkpointing = model.is_activation_checkpointing
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        was_checkpointing = model.is_gradient_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    model.requires_grad_(False)
    model.train()
    try:
        yield
    finally:
        if not was_checkpointing:
            disable()
        model.train(was_training)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def schedule(settings: DuoTraining):
    """Learning-rate factor per step: linear warm-up, flat, linear decay to 0.1x (the reference's)."""
    warm, decay_from = settings.warmup * settings.steps, (1 - settings.decay) * settings.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if step >= decay_from:
            return 1.0 - 0.9 * (step - decay_from) / max(settings.steps - decay_from, 1)
        return 1.0

    return factor


def final_hidden(model, input_ids):
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def train_gates(model, data: PasskeyData, settings: DuoTraining, checkpoint: Path | None = None, progress=True):
    """Optimise the gates; returns ``[num_layers, num_kv_heads]`` float32 in [0, 1].

    With ``checkpoint``, progress is saved there every ``settings.checkpoint_every`` steps and a run
    with the same arguments resumes from it; a checkpoint of other arguments is ignored (start over).
    """
    shape = describe(model).shape
    device = next(model.parameters()).device
    gates = torch.nn.Parameter(torch.ones(shape.num_layers, shape.num_kv_heads, device=device))
    optimizer = torch.optim.AdamW([gates], lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))
    run_key = hashlib.sha256(json.dumps([asdict(settings), asdict(data.recipe), data.seed, shape.to_dict()]).encode()).hexdigest()
    first = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device)
        if state.get("run_key") == run_key:
            with torch.no_grad():
                gates.copy_(state["gates"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            first = state["step"]

    teacher = Teacher()
    student = GatedStudent(gates, teacher, settings.sink, settings.recent)
    bar = tqdm(range(first, settings.steps), initial=first, total=settings.steps, disable=not progress, desc="duo gates")
    with frozen_with_checkpointing(model):
        for step in bar:
            sample = data.sample(step)
            input_ids, span = sample.input_ids.to(device), sample.supervised.to(device)
            with torch.no_grad(), attention_override(model, teacher):
                target = final_hidden(model, input_ids)[0, span].float()
            with attention_override(model, student):  # backward recomputes layers: stay inside
                predicted = final_hidden(model, input_ids)[0, span].float()
                distill = F.mse_loss(predicted, target)
                loss = distill + settings.reg * gates.abs().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            teacher.outputs.clear()
            bar.set_postfix(loss=f"{distill.item():.3g}", streaming=f"{(gates < 0.5).float().mean().item():.2f}")
            done = step + 1
            if checkpoint is not None and (done % settings.checkpoint_every == 0) and done < settings.steps:
                state = {"run_key": run_key, "step": done, "gates": gates.detach().cpu(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))
    return gates.detach().float().cpu()


class MassProbe:
    """Dense attention that also measures, per KV head, the attention mass a sink + recent window
    would drop for the probed queries."""

    def __init__(self, num_layers: int, num_kv_heads: int, sink: int, recent: int, chunk: int = 256):
        self.lost = torch.zeros(num_layers, num_kv_heads)
        self.sink, self.recent, self.chunk = sink, recent, chunk
        self.queries: torch.Tensor | None = None  # positions of the probed queries

    def attention(self, module, query, key, value, attention_mask, scaling, sliding_window=None, **kwargs):
        out = causal_attention(query, key, value, scaling, sliding_window)
        group = module.num_key_value_groups
        keys = key.float().repeat_interleave(group, 1)
        key_pos = torch.arange(key.shape[2], device=query.device)[None]
        lost = torch.zeros(query.shape[1], device=query.device)
        for chunk in self.queries.to(query.device).split(self.chunk):
            causal = rank_mask(chunk[None], key_pos)[0]  # [1, n, L]
            kept = rank_mask(chunk[None], key_pos, self.sink, self.recent)[0]
            scores = query[:, :, chunk].float() @ keys.transpose(-1, -2) * scaling
            probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            lost += (1 - (probs * kept).sum(-1)).sum(dim=(0, 2))
        per_kv_head = lost.view(-1, group).mean(1) / (len(self.queries) * query.shape[0])
        self.lost[module.layer_idx] += per_kv_head.cpu()
        return out.transpose(1, 2), None


@torch.no_grad()
def attention_mass_gates(model, data: PasskeyData, samples: int, sink: int, recent: int, progress=True) -> torch.Tensor:
    """Gates without training (the paper's "on the fly" variant): the mean attention mass a sink +
    recent window drops on the answer tokens of ``samples`` calibration samples (high = retrieval)."""
    shape = describe(model).shape
    device = next(model.parameters()).device
    probe = MassProbe(shape.num_layers, shape.num_kv_heads, sink, recent)
    for index in tqdm(range(samples), disable=not progress, desc="attention mass"):
        sample = data.sample(index)
        probe.queries = sample.supervised.nonzero().flatten()
        with attention_override(model, probe):
            model.base_model(input_ids=sample.input_ids.to(device), use_cache=False)
    return (probe.lost / samples).clamp(0.0, 1.0)


def make_config(gates: torch.Tensor, model, sink: int, recent: int, sparsity: float) -> DuoConfig:
    return DuoConfig(gates=gates, sink=sink, recent=recent, sparsity=sparsity, model_shape=describe(model).shape)
