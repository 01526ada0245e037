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

import copy
import hashlib
import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpress.adapters import describe
from kvpress.api import attention_override
from kvpress.configfile import atomic_write
from kvpress.kernels.reference import rank_mask
from kvpress.methods.duo import DuoConfig

from .data import DEFAULT_DATA, KINDS, RECOMMENDED_DATA, PasskeyData, PasskeyRecipe, read_haystack

log = logging.getLogger("kvpress")


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train_gates``; ``step`` steps were done and saved to ``checkpoint`` (if any)."""

    def __init__(self, step: int, steps: int, checkpoint: Path | None):
        super().__init__(step)
        self.step, self.steps, self.checkpoint = step, steps, checkpoint


def train_gates(model, data: PasskeyData, settings: DuoTraining, checkpoint: Path | None = None, progress=True):
    """Optimise the gates; returns ``[num_layers, num_kv_heads]`` float32 in [0, 1].

    With ``checkpoint``, progress is saved there every ``settings.checkpoint_every`` steps and when
    the run is interrupted (Ctrl-C: ``TrainingInterrupted``, a KeyboardInterrupt, is raised after
    saving the last finished step); a run with the same arguments resumes from it, a checkpoint of
    other arguments is ignored (start over).
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
            log.info("resuming from step %d of %d (%s)", first, settings.steps, checkpoint)
        else:
            log.info("ignoring %s: it was made with other arguments; starting over", checkpoint)

    def snapshot(step: int) -> dict:  # the state after `step` finished steps (gates are tiny: copying is cheap)
        return {"run_key": run_key, "step": step, "gates": gates.detach().cpu().clone(),
                "optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": scheduler.state_dict()}

    def save(state: dict) -> None:
        atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))

    teacher = Teacher()
    student = GatedStudent(gates, teacher, settings.sink, settings.recent)
    bar = tqdm(range(first, settings.steps), initial=first, total=settings.steps, disable=not progress, desc="duo gates")
    last = snapshot(first) if checkpoint is not None else None
    try:
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
                # the share of gates below 0.5, as in the closing line of `kvpress-calibrate duo`
                bar.set_postfix({"loss": f"{distill.item():.3g}", "gates<0.5": f"{(gates < 0.5).float().mean().item():.0%}"})
                done = step + 1
                if checkpoint is not None:
                    last = snapshot(done)
                    if done % settings.checkpoint_every == 0 and done < settings.steps:
                        save(last)
    except KeyboardInterrupt:
        bar.close()
        if last is not None and last["step"] > 0:
            save(last)
            raise TrainingInterrupted(last["step"], settings.steps, checkpoint) from None
        raise TrainingInterrupted(first, settings.steps, None) from None
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


def calibrate_duo(
    model,
    tokenizer,
    out: str | Path | None = None,
    method: str = "optimize",
    training: DuoTraining = DuoTraining(),
    recipe: PasskeyRecipe = PasskeyRecipe(),
    haystack: list[str | Path] | None = None,
    samples: int = 8,
    sink: int = 64,
    recent: int = 256,
    sparsity: float = 0.5,
    seed: int = 0,
    pattern_dir: str | Path | None = None,
    progress: bool = True,
) -> DuoConfig:
    """Calibrate DuoAttention gates for ``model`` and return (and, with ``out``, save) its config.

    method: ``"optimize"`` (the paper's optimisation) or ``"attention-mass"`` (no training).
    sink, recent, sparsity: the deployment settings recorded in the config (the raw gates are saved,
    so sparsity can still be chosen at patch time).
    """
    shape = describe(model).shape  # fails clearly for unsupported families
    window = getattr(model.config, "max_position_embeddings", None)
    if window is not None and recipe.max_length > window:
        raise ValueError(
            f"--max-length {recipe.max_length} exceeds the model's max_position_embeddings ({window}); "
            f"calibrate at lengths up to {window}"
        )
    if recipe.min_length > recipe.max_length:
        raise ValueError(f"--min-length {recipe.min_length} is above --max-length {recipe.max_length}")
    data = PasskeyData(tokenizer, recipe, read_haystack(haystack), seed=seed)
    if method == "optimize":
        checkpoint = None if out is None else Path(str(out) + ".partial")
        gates = train_gates(model, data, training, checkpoint=checkpoint, progress=progress)
    elif method == "attention-mass":
        gates = attention_mass_gates(model, data, samples, training.sink, training.recent, progress=progress)
    else:
        raise ValueError(f"unknown calibration method {method!r}; choose 'optimize' or 'attention-mass'")
    config = make_config(gates, model, sink, recent, sparsity)
    assert tuple(config.gates.shape) == (shape.num_layers, shape.num_kv_heads)
    if out is not None:
        config.save(out)
        Path(str(out) + ".partial").unlink(missing_ok=True)
    if pattern_dir is not None:
        config.save_pattern_dir(pattern_dir)
    return config


# -- the `kvpress-calibrate duo` sub-command ------------------------------------------------------

HELP = "DuoAttention gates (retrieval vs streaming KV heads), arXiv 2410.10819"

# (passkeys, words) tried in turn when the defaults do not fit the shortest calibration length
SMALLER_PASSKEYS = ((10, 32), (8, 16), (6, 8), (4, 6), (3, 4), (2, 4), (1, 2))

OPTION_HELP = {
    "steps": "optimisation steps (one sample each)",
    "lr": "AdamW learning rate of the gates",
    "reg": "weight of the L1 penalty mean(|gate|) that pushes heads to streaming",
    "sink": "TRAINING ONLY: sink tokens of the streaming attention the gates are trained against "
            "(the reference's; not the deployed --sink)",
    "recent": "TRAINING ONLY: recent tokens of the streaming attention the gates are trained against "
              "(the reference's; not the deployed --recent)",
    "warmup": "fraction of the steps with a linear learning-rate warm-up",
    "decay": "fraction of the final steps with a linear decay to 0.1x the learning rate",
    "checkpoint_every": "steps between checkpoints written to OUT.partial (Ctrl-C also writes one)",
    "min_length": "shortest calibration sample in tokens (default: 1024, or a quarter of --max-length if smaller)",
    "max_length": "longest calibration sample in tokens (default: 32768, clipped to the model's "
                  "max_position_embeddings)",
    "num_lengths": "evenly spaced sample lengths between --min-length and --max-length",
    "num_passkeys": "needles asked per sample: passkeys, looked-up keys or values of the key "
                    "(default: 10, fewer if they do not fit in --min-length)",
    "passkey_words": "NATO-alphabet words per passkey (default: 32, fewer if they do not fit in --min-length)",
    "min_depth": "shallowest needle depth (fraction of the haystack)",
    "max_depth": "deepest needle depth (fraction of the haystack)",
    "data": f"comma-separated mix of calibration needles, from {','.join(KINDS)}: passkeys of words, "
            f"key-value lookups in a JSON object, several values of one key (one kind per sample; default: {RECOMMENDED_DATA}, "
            "which measured best: docs/duo.md)",
}
FIT_TO_MODEL = ("min_length", "max_length", "num_passkeys", "passkey_words", "data")  # None default: chosen per model


def add_arguments(parser) -> None:
    """The options of ``kvpress-calibrate duo``."""
    parser.add_argument("--model", required=True, help="local model folder (transformers format); required")
    parser.add_argument("--out", required=True, help="config file to write (safetensors); required")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    parser.add_argument("--method", choices=["optimize", "attention-mass"], default="optimize",
                        help="optimize: the paper's training; attention-mass: quick scoring, no training")
    parser.add_argument("--pattern-dir", help="also write the reference format (full_attention_heads.tsv + "
                        "config.json) to this folder (default: none)")
    parser.add_argument("--haystack", nargs="*", help="haystack text files, .txt or .gz (default: the bundled corpus)")
    parser.add_argument("--samples", type=int, default=8, help="samples scored by --method attention-mass")
    parser.add_argument("--sink", type=int, default=64, help="sink tokens a streaming head keeps when deployed, recorded in the config (see --train-sink)")
    parser.add_argument("--recent", type=int, default=256, help="recent tokens a streaming head keeps when deployed, recorded in the config (see --train-recent)")
    parser.add_argument("--sparsity", type=float, default=0.5,
                        help="fraction of KV heads made streaming at patch time, recorded in the config")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model weights' dtype (auto: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    for dataclass_type, prefix in ((DuoTraining, "train-"), (PasskeyRecipe, "")):
        for field in fields(dataclass_type):
            name = field.name.replace("_", "-")
            if name in ("sink", "recent"):
                name = prefix + name
            fit = dataclass_type is PasskeyRecipe and field.name in FIT_TO_MODEL
            default = None if fit or field.name == "data" else field.default
            parser.add_argument(f"--{name}", type=type(field.default), default=default,
                                dest=field.name, help=OPTION_HELP[field.name], metavar=field.name.upper())


def _fits(recipe: PasskeyRecipe, tokenizer) -> bool:
    return PasskeyData(tokenizer, recipe, "", check=False).fixed_tokens() <= recipe.min_length // 2


def _smallest_passkeys(recipe: PasskeyRecipe, given: dict, tokenizer) -> PasskeyRecipe:
    """The first of SMALLER_PASSKEYS that fits (the last if none does), unless the user set them."""
    if given["num_passkeys"] is not None or given["passkey_words"] is not None:
        return recipe
    for count, words in SMALLER_PASSKEYS:
        fitted = replace(recipe, num_passkeys=count, passkey_words=words)
        if _fits(fitted, tokenizer):
            break
    return fitted


def fit_recipe(args, model, tokenizer) -> PasskeyRecipe:
    """The recipe of the arguments, with the lengths, data and passkeys the user left to their
    defaults fitted to the model (each change logged): --max-length clipped to
    max_position_embeddings, --min-length at most a quarter of it, the recommended data mix unless
    its needles cannot fit (then passkeys alone), passkeys shrunk until they take at most half of
    the shortest sample."""
    given = {f.name: getattr(args, f.name) for f in fields(PasskeyRecipe)}
    recipe = PasskeyRecipe(**{k: v for k, v in given.items() if v is not None})
    window = getattr(model.config, "max_position_embeddings", None)
    if given["max_length"] is None and window is not None and recipe.max_length > window:
        log.info("calibrating at lengths up to %d tokens, the model's max_position_embeddings "
                 "(--max-length defaults to %d)", window, recipe.max_length)
        recipe = replace(recipe, max_length=window)
    if given["min_length"] is None and recipe.min_length > recipe.max_length // 4:
        recipe = replace(recipe, min_length=max(recipe.max_length // 4, 1))
        log.info("shortest calibration sample: %d tokens (a quarter of --max-length)", recipe.min_length)
    if given["data"] is None:  # the recommended mix, unless even its smallest needles do not fit
        recipe = replace(recipe, data=RECOMMENDED_DATA)
        if not _fits(_smallest_passkeys(recipe, given, tokenizer), tokenizer):
            log.info("key-value and multi-value needles do not fit in half of the shortest sample (%d tokens): "
                     "calibrating on passkeys alone (--data %s)", recipe.min_length, DEFAULT_DATA)
            recipe = replace(recipe, data=DEFAULT_DATA)
    if given["num_passkeys"] is None and given["passkey_words"] is None:
        fitted = _smallest_passkeys(recipe, given, tokenizer)
        if (fitted.num_passkeys, fitted.passkey_words) != (recipe.num_passkeys, recipe.passkey_words):
            log.info("%d needles of %d words do not fit in half of the shortest sample (%d tokens): using %d of %d "
                     "words (set --num-passkeys / --passkey-words to choose)", recipe.num_passkeys,
                     recipe.passkey_words, recipe.min_length, fitted.num_passkeys, fitted.passkey_words)
        recipe = fitted
    return recipe


def main(args) -> int:
    """Run ``kvpress-calibrate duo`` with parsed ``args``: 0 when the config is written, 2 on an
    error (printed in one line), 130 when interrupted (progress kept in OUT.partial)."""
    from .cli import load_model_and_tokenizer

    training = DuoTraining(**{f.name: getattr(args, f.name) for f in fields(DuoTraining)})
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype, args.tokenizer)
        recipe = fit_recipe(args, model, tokenizer)
        started = time.perf_counter()
        config = calibrate_duo(
            model, tokenizer, out=args.out, method=args.method, training=training, recipe=recipe,
            haystack=args.haystack, samples=args.samples, sink=args.sink, recent=args.recent,
            sparsity=args.sparsity, seed=args.seed, pattern_dir=args.pattern_dir, progress=not args.no_progress,
        )
    except TrainingInterrupted as stop:
        where = f"progress saved to {stop.checkpoint}; run the same command to resume" if stop.checkpoint else "nothing saved"
        print(f"kvpress-calibrate: interrupted at step {stop.step} of {stop.steps}; {where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("kvpress-calibrate: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:
        print(f"kvpress-calibrate: error: {error}", file=sys.stderr)
        return 2
    below = (config.gates < 0.5).float().mean().item()
    streaming = int((~config.retrieval_heads()).sum())
    print(f"wrote {args.out}: gates for {config.gates.shape[0]} layers x {config.gates.shape[1]} KV heads "
          f"({time.perf_counter() - started:.1f} s); gates<0.5: {below:.0%} (as in the progress bar); "
          f"at sparsity {config.sparsity} (patch time), {streaming} of {config.gates.numel()} heads stream")
    return 0
