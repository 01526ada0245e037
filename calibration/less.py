"""LESS feature-map training (Dong et al., 2024, arXiv 2402.09398, section 4), layer by layer.

    kvpress-calibrate less --model PATH --out DIR [--policy lambda --sink 4 --recent 200 ...]

Teacher-forced and per layer, as the reference: the frozen model reads text windows with full
attention; for each layer we keep its post-RoPE Q, K, V, the policy's eviction times (the same
decode-by-decode rule as the runtime), the sparse attention's output and normaliser, and the layer's
full-attention output after ``o_proj``. The maps phi (queries) and psi (keys) are then trained so
that ``o_proj(LESS attention)`` matches that output under MSE, only at positions where eviction has
begun. Adam, lr 1e-3 halved every 10 of 40 epochs, batch 2, dropout 0.3, and the epoch of lowest
loss on 10% held-out windows kept (all options), as the reference code.

Bounded memory: activations go to disk (``--spill-dir``, default next to ``--out``), one sample of
one layer in RAM at a time, or with ``--in-memory`` stay in the training device's memory; layers
are captured in groups that fit ``--spill-gb`` (the forward stops after the group's last layer),
trained, and their activations dropped. Each trained layer is saved in ``DIR.partial/`` at once, so
an interrupted run resumes where it stopped (with the same arguments; others start over). The final
folder (``less.json`` + ``less.safetensors``) is written atomically.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kvpress.adapters import describe
from kvpress.configfile import atomic_write
from kvpress.kernels.less_reference import FeatureWeights, eviction_times, sparse_part, with_state
from kvpress.methods.less import WEIGHT_NAMES, FeatureMaps, LessConfig

CAPTURE_ATTENTION = "kvpress_less_capture"


@dataclass(frozen=True)
class LessTraining:
    """Training settings; defaults are the reference's (512 windows of 4096 tokens, 40 epochs, lr 1e-3
    halved every 10 epochs, batch 2, dropout 0.3, 10% of the windows held out to keep the best epoch)."""

    samples: int = 512
    length: int = 4096  # tokens per window
    epochs: int = 40
    batch_size: int = 2
    lr: float = 1e-3
    halve_every: int = 10  # epochs between learning-rate halvings
    dropout: float = 0.3
    val_fraction: float = 0.1  # windows held out; the epoch of lowest held-out loss is kept (0: the last epoch)
    capture_batch: int = 1  # windows per forward of the frozen model while capturing
    in_memory: bool = False  # hold captured activations in the training device's memory (still at most spill_gb)
    spill_gb: float = 20.0  # disk (or memory) for captured activations at a time
    seed: int = 0


class _Stop(Exception):
    """Raised inside the forward once the last layer of a capture group has been recorded."""


def text_windows(tokenizer, count: int, length: int, seed: int, text: str | None = None):
    """``count`` windows of ``length`` tokens (BOS first when the tokenizer adds one) of ``text``
    (default: the corpus bundled with kvpress), at seeded random offsets."""
    if text is None:
        from kvpress.eval.tasks import load_corpus

        text = load_corpus("train")
    prefix = tokenizer.encode("", add_special_tokens=True)
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    body = length - len(prefix)
    if len(ids) <= body:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than --length {length}; lower --length")
    rng = random.Random(seed)
    for _ in range(count):
        start = rng.randrange(len(ids) - body)
        yield torch.tensor([prefix + ids[start : start + body]])


@contextmanager
def capture(model, record):
    """Within the block the model's attention is exact causal SDPA, and ``record(module, q, k, v,
    out)`` sees every layer's post-RoPE q/k/v and output (``[B, L, H, D]``)."""
    from transformers import AttentionInterface

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        out = out.transpose(1, 2).contiguous()
        record(module, query, key, value, out)
        return out, None

    AttentionInterface.register(CAPTURE_ATTENTION, attend)
    config = model.config
    old = config._attn_implementation
    config._attn_implementation_internal = CAPTURE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation_internal = old


def bytes_per_layer_sample(shape, length: int, itemsize: int) -> int:
    """Disk bytes of one layer's activations of one window (q, k, v, o_kept, target, lse, times)."""
    h, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    return length * ((3 * h * d + 2 * hkv * d) * itemsize + 4 * h + 8 * hkv)


def free_bytes(folder: Path) -> int:
    """Free disk bytes where ``folder`` is (or would be made)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def spill_budget(spill: Path, spill_gb: float, in_memory: bool) -> float:
    """Bytes of activations to hold at a time: ``spill_gb``, and on disk at most 90% of the free space
    where they spill (a full disk would stop the capture half-way with an unclear error)."""
    budget = spill_gb * 1e9
    return budget if in_memory else min(budget, 0.9 * free_bytes(spill))


class Activations:
    """Captured activations of one group of layers, one item per (layer, window): files under
    ``spill`` (``layer{l}/{i}.pt``), or tensors on ``device`` when ``in_memory``."""

    def __init__(self, spill: Path, in_memory: bool, device):
        self.spill, self.in_memory, self.device = spill, in_memory, device
        self.items: dict[int, list] = {}

    def add(self, layer: int, index: int, item: dict) -> None:
        if self.in_memory:
            entry = {n: t.to(self.device) for n, t in item.items()}
        else:
            (self.spill / f"layer{layer}").mkdir(parents=True, exist_ok=True)
            entry = self.spill / f"layer{layer}" / f"{index}.pt"
            # a copy of its own: a slice saved as is writes the whole batch's storage (capture_batch times the bytes)
            torch.save({n: t.to("cpu", copy=True, memory_format=torch.contiguous_format) for n, t in item.items()}, entry)
        self.items.setdefault(layer, []).append(entry)

    def load(self, entries: list) -> dict:
        """The items ``entries`` as one batch on the training device."""
        items = [e if isinstance(e, dict) else torch.load(e, map_location=self.device) for e in entries]
        return {n: torch.cat([it[n] for it in items]) for n in items[0]}

    def clear(self) -> None:
        self.items = {}
        shutil.rmtree(self.spill, ignore_errors=True)


@torch.no_grad()
def capture_group(model, info, layers: list[int], windows: list[torch.Tensor], config: LessConfig, store: Activations,
                  dtype, progress: bool, batch: int = 1) -> None:
    """Run every window through the model (``batch`` at a time) and add each layer's activations of
    each window to ``store`` for the layers in ``layers``."""
    policy, last = config.budget, max(layers)
    first = {"i": 0}

    def record(module, q, k, v, out):
        layer = module.layer_idx
        if layer in layers:
            scale = getattr(module, "scaling", q.shape[-1] ** -0.5)
            evict_at = eviction_times(q, k, policy, scale)
            o_kept, lse_kept = sparse_part(q, k, v, evict_at, scale)
            target = module.o_proj(out.reshape(out.shape[0], out.shape[1], -1))
            item = {"q": q, "k": k, "v": v, "o_kept": o_kept, "lse_kept": lse_kept, "target": target, "evict_at": evict_at}
            item = {n: t.to(dtype) if t.is_floating_point() and n != "lse_kept" else t for n, t in item.items()}
            for j in range(q.shape[0]):
                store.add(layer, first["i"] + j, {n: t[j : j + 1] for n, t in item.items()})
        if layer == last:
            raise _Stop

    device = next(model.parameters()).device
    batches = [torch.cat(windows[i : i + batch]) for i in range(0, len(windows), batch)]
    with capture(model, record):
        for ids in tqdm(batches, desc=f"capture layers {layers[0]}-{last}", disable=not progress, leave=False):
            try:
                model(ids.to(device), use_cache=False)
            except _Stop:
                pass
            first["i"] += ids.shape[0]


def layer_loss(maps: FeatureMaps, o_proj, batch: dict, with_maps: bool = True) -> torch.Tensor:
    """MSE of ``o_proj(LESS attention)`` against the full output, over positions where eviction has begun."""
    o_kept, lse = batch["o_kept"].float(), batch["lse_kept"]
    if with_maps:
        out = with_state(o_kept, lse, maps.phi(batch["q"]), maps.psi(batch["k"]), batch["v"], batch["evict_at"])
    else:
        out = o_kept
    b, h, length, d = out.shape
    pred = F.linear(out.transpose(1, 2).reshape(b, length, h * d), o_proj.weight.float(),
                    None if o_proj.bias is None else o_proj.bias.float())
    begun = batch["evict_at"].flatten(1).min(dim=1).values  # [B]: first position that misses a token
    mask = torch.arange(length, device=out.device)[None, :] >= begun[:, None]
    err = (pred - batch["target"].float()).pow(2).mean(dim=-1)
    return (err * mask).sum() / mask.sum().clamp_min(1)


def train_layer(module, store: Activations, config: LessConfig, shape, training: LessTraining, device,
                progress: bool) -> tuple[FeatureWeights, dict]:
    """Train one layer's maps on its captured windows, keeping the epoch of lowest held-out loss (the
    reference's checkpointing); returns the weights and the losses (held-out, or training windows
    when none are held out)."""
    torch.manual_seed(training.seed + module.layer_idx)
    maps = FeatureMaps(shape.head_dim, shape.num_heads, config.num_state_heads(shape), config.rank, config.hidden,
                       training.dropout).to(device)
    optimizer = torch.optim.Adam(maps.parameters(), lr=training.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, training.halve_every), gamma=0.5)
    rng = random.Random(training.seed)
    entries = store.items[module.layer_idx]
    held = min(len(entries) - 1, round(training.val_fraction * len(entries))) if training.val_fraction > 0 else 0
    train, val = entries[: len(entries) - held], entries[len(entries) - held :] or entries

    def evaluate(with_maps=True) -> float:
        maps.eval()
        with torch.no_grad():
            return sum(layer_loss(maps, module.o_proj, store.load([e]), with_maps).item() for e in val) / len(val)

    best, best_loss, history = maps.weights(), evaluate(), []
    bar = tqdm(range(training.epochs), desc=f"layer {module.layer_idx}", disable=not progress, leave=False)
    for _ in bar:
        maps.train()
        order = train[:]
        rng.shuffle(order)
        for start in range(0, len(order), training.batch_size):
            loss = layer_loss(maps, module.o_proj, store.load(order[start : start + training.batch_size]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        history.append(evaluate())
        if history[-1] < best_loss:
            best, best_loss = maps.weights(), history[-1]
        bar.set_postfix(loss=f"{history[-1]:.3g}")
    return best, {"mse_sparse": evaluate(with_maps=False), "mse_less": best_loss, "held_out": held, "history": history}


def calibrate_less(model, tokenizer, out: str | Path, config: LessConfig = LessConfig(), training: LessTraining = LessTraining(),
                   spill_dir: str | Path | None = None, text: str | None = None, progress: bool = True) -> LessConfig:
    """Train LESS maps for ``model`` and write the config folder ``out``; returns the config.

    ``config`` gives the policy, budget, rank, hidden width and state heads (its maps are ignored)."""
    info = describe(model)
    shape = info.shape
    out = Path(out)
    partial = Path(str(out) + ".partial")
    spill = Path(spill_dir) if spill_dir else Path(str(out) + ".spill")
    settings = {"config": config.fields_dict(), "training": asdict(training), "shape": shape.to_dict()}
    if (partial / "settings.json").is_file() and json.loads((partial / "settings.json").read_text()) != settings:
        shutil.rmtree(partial)  # other arguments: start over
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "settings.json").write_text(json.dumps(settings))
    if training.length <= config.budget.budget + 1:
        raise ValueError(f"--length {training.length} leaves nothing to evict at a budget of {config.budget.budget} "
                         "tokens; raise --length or lower the budget")
    for name in ("samples", "epochs", "batch_size", "capture_batch"):
        if getattr(training, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    windows = list(text_windows(tokenizer, training.samples, training.length, training.seed, text))
    per_layer = training.samples * bytes_per_layer_sample(shape, training.length, torch.finfo(dtype).bits // 8)
    group_size = int(spill_budget(spill, training.spill_gb, training.in_memory) // per_layer)
    if group_size < 1:
        where = "" if training.in_memory else f" and 90% of the {free_bytes(spill) / 1e9:.1f} GB free under {spill}"
        raise ValueError(f"one layer's activations take {per_layer / 1e9:.1f} GB, more than --spill-gb "
                         f"{training.spill_gb}{where}; raise --spill-gb, free disk space or spill elsewhere "
                         "(--spill-dir), or lower --samples / --length")
    todo = [i for i in range(shape.num_layers) if not (partial / f"layer{i:03d}.safetensors").is_file()]
    losses = json.loads((partial / "losses.json").read_text()) if (partial / "losses.json").is_file() else {}
    store = Activations(spill, training.in_memory, device)
    for start in range(0, len(todo), group_size):
        group = todo[start : start + group_size]
        store.clear()
        capture_group(model, info, group, windows, config, store, dtype, progress, training.capture_batch)
        for layer in group:
            with torch.enable_grad():
                weights, loss = train_layer(info.attention_modules[layer], store, config, shape, training, device, progress)
            tensors = {n: getattr(weights, n).float().cpu().contiguous() for n in WEIGHT_NAMES}
            atomic_write(partial / f"layer{layer:03d}.safetensors", lambda tmp: save_file(tensors, tmp))
            losses[str(layer)] = loss
            (partial / "losses.json").write_text(json.dumps(losses, indent=1))
            if progress:
                print(f"layer {layer}: MSE sparse {loss['mse_sparse']:.4g} -> LESS {loss['mse_less']:.4g}", file=sys.stderr)
        store.clear()
    layers = [FeatureWeights(**load_file(str(partial / f"layer{i:03d}.safetensors"))) for i in range(shape.num_layers)]
    result = dataclasses_replace(config, layers=layers, model_shape=shape)
    result.save(out)
    (out / "training.json").write_text(json.dumps({**settings, "losses": losses}, indent=1) + "\n")
    shutil.rmtree(partial)
    return result


def dataclasses_replace(config: LessConfig, **changes) -> LessConfig:
    return LessConfig(**{**config.fields_dict(), **changes})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvpress-calibrate less``."""
    parser.add_argument("--model", required=True, help="local model folder (transformers format)")
    parser.add_argument("--out", required=True, help="config folder to write (less.json + less.safetensors)")
    parser.add_argument("--tokenizer", help="tokenizer folder, if not the model's")
    parser.add_argument("--text", nargs="*", help="training text files (.txt or .gz); default: the bundled corpus")
    parser.add_argument("--spill-dir", help="where captured activations go (default OUT.spill)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--no-progress", action="store_true")
    defaults = LessConfig()
    parser.add_argument("--policy", choices=["lambda", "h2o"], default=defaults.policy)
    for name in ("sink", "heavy", "recent", "rank", "hidden"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"(default {getattr(defaults, name)}; "
                            "with --policy h2o: sink 0, heavy 102, recent 102)" if name in ("sink", "heavy", "recent") else
                            f"(default {getattr(defaults, name)})")
    parser.add_argument("--state-heads", choices=["kv", "query"], default=defaults.state_heads)
    for f in fields(LessTraining):
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", dest=f.name)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, dest=f.name,
                                help=f"(default {f.default})")


def config_from_args(args) -> LessConfig:
    base = {"lambda": dict(sink=4, heavy=0, recent=200), "h2o": dict(sink=0, heavy=102, recent=102)}[args.policy]
    sizes = {n: getattr(args, n) for n in ("sink", "heavy", "recent", "rank", "hidden") if getattr(args, n) is not None}
    return LessConfig(policy=args.policy, state_heads=args.state_heads, **{**base, **sizes})


def main(args: argparse.Namespace) -> int:
    """Run ``kvpress-calibrate less`` with parsed ``args`` (see :func:`add_arguments`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        config = config_from_args(args)
        training = LessTraining(**{f.name: getattr(args, f.name) for f in fields(LessTraining)})
        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        dtype = dtype or (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load the model / tokenizer from {args.model}: {error}") from None
        model = model.to(args.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        text = None
        if args.text:
            from .data import read_haystack

            text = read_haystack(args.text)
        started = time.perf_counter()
        result = calibrate_less(model, tokenizer, args.out, config, training, args.spill_dir, text, not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvpress-calibrate less: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: LESS maps for {len(result.layers)} layers ({result.policy}, sink {result.sink}, heavy "
          f"{result.heavy}, recent {result.recent}, rank {result.rank}) in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="kvpress-calibrate less", description=__doc__.split("\n\n")[0])
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
