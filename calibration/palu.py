"""Palu calibration (arXiv 2407.21118): factor every layer's ``k_proj`` and ``v_proj`` into low-rank
``down`` / ``up`` pairs per head group and allocate the ranks.

    kvpress-calibrate palu --model PATH --out DIR [--ratio 0.5] [--group-size 4] ...

The procedure, top to bottom (``calibrate_palu``):

1. Statistics over calibration text (bundled haystack, ``--samples`` x ``--seq-len`` tokens), in one
   pass: ``X^T X`` of each attention's input (what ``k_proj`` and ``v_proj`` read), accumulated in
   fp32 without keeping activations (SVD-LLM whitening), and, for Fisher allocation, the squared
   gradients of the LM loss w.r.t. the ``k_proj`` / ``v_proj`` weights (the only weights that get
   gradients).
2. Ranks (``allocate_ranks``): Fisher information ``sqrt(mean_samples grad^2)`` averaged per module
   (each layer's K and V); the total rank budget (``ratio`` x full rank of every module) is shared in
   proportion, capped at full rank (the excess goes to the others), split evenly over the module's
   head groups and rounded to a multiple of ``--multiple``. ``--allocation uniform`` gives every
   module the same rank.
3. Factors per layer (``factorize``), each group of ``gs`` KV heads separately (G-LRD): whitening
   ``S = chol(X^T X)`` (eigenvalues shifted when not positive definite), truncated SVD
   ``W S = U Sigma V^T``, ``up = U sqrt(Sigma)``, ``down = sqrt(Sigma) V^T S^-1``;
   ``--decomposition svd`` factors ``W`` itself.

An interrupted run leaves ``DIR.partial/`` (statistics, then one file per decomposed layer); a
restart with the same options resumes there. The output folder is written atomically.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kvpress.adapters import describe
from kvpress.configfile import atomic_write
from kvpress.methods.palu import PaluConfig

from .data import read_haystack


@dataclass(frozen=True)
class PaluCalibration:
    """Calibration options (defaults: Palu-50%, the reference's group size and rounding)."""

    ratio: float = 0.5  # kept fraction of the full rank over all K/V modules (0.5 = Palu-50%)
    group_size: int = 4  # KV heads per head group (all heads when the model has fewer)
    allocation: str = "fisher"  # "fisher" or "uniform"
    decomposition: str = "whiten"  # "whiten" (SVD-LLM) or "svd" (plain)
    multiple: int = 32  # per-group ranks are rounded to a multiple of this
    samples: int = 32  # calibration sequences
    seq_len: int = 2048  # tokens per sequence
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.allocation not in ("fisher", "uniform"):
            raise ValueError(f"--allocation must be 'fisher' or 'uniform', got {self.allocation!r}")
        if self.decomposition not in ("whiten", "svd"):
            raise ValueError(f"--decomposition must be 'whiten' or 'svd', got {self.decomposition!r}")
        if self.group_size < 1 or self.multiple < 1 or self.samples < 1 or self.seq_len < 2:
            raise ValueError("--group-size, --multiple and --samples must be >= 1, --seq-len >= 2")

    @property
    def needs_data(self) -> bool:
        return self.allocation == "fisher" or self.decomposition == "whiten"


# -- the math -------------------------------------------------------------------------------------


def head_groups(num_kv_heads: int, group_size: int) -> tuple[int, int]:
    """``(gs, G)``: KV heads per group (``group_size``, or all heads when fewer) and groups."""
    gs = min(group_size, num_kv_heads)
    if num_kv_heads % gs:
        raise ValueError(f"--group-size {gs} does not divide the model's {num_kv_heads} KV heads; choose a divisor")
    return gs, num_kv_heads // gs


def whitening(xtx: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor ``S`` of ``X^T X`` (float64), eigenvalues shifted to stay positive when
    needed (SVD-LLM; Palu's reference shifts by ``1e-3 - lambda_min``)."""
    a = xtx.double()
    a = (a + a.T) / 2
    s, info = torch.linalg.cholesky_ex(a)
    if info == 0:
        return s
    shift = 1e-3 - torch.linalg.eigvalsh(a)[0]
    return torch.linalg.cholesky(a + shift * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))


def factorize(weight: torch.Tensor, groups: int, rank: int, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``weight [G * o, hidden]`` per group of ``o`` output rows into ``up [G, o, rank]`` and
    ``down [G * rank, hidden]`` (float32) so that ``up[g] @ down[g-block] ~ weight[g-block]``.

    With the whitening factor ``s`` (:func:`whitening`) the truncation minimises the error on the
    calibration activations: ``W s = U Sigma V^T``, ``up = U sqrt(Sigma)``, ``down = sqrt(Sigma) V^T s^-1``.
    """
    ups, downs = [], []
    for w in weight.double().chunk(groups, dim=0):
        target = w @ s if s is not None else w
        u, sigma, vt = torch.linalg.svd(target, full_matrices=False)
        root = sigma[:rank].sqrt()
        vt = vt[:rank]
        if s is not None:
            vt = torch.linalg.solve_triangular(s, vt, upper=False, left=False)  # V^T S^-1
        ups.append(u[:, :rank] * root)
        downs.append(root[:, None] * vt)
    return torch.stack(ups).float(), torch.cat(downs).float()


def allocate_ranks(scores: torch.Tensor, full: int, groups: int, ratio: float, multiple: int) -> torch.Tensor:
    """Per-group ranks ``[L, 2]`` (keys, values) from module scores ``[L, 2]`` (Palu's Fisher search).

    The budget ``ratio * full * groups * 2L`` is shared in proportion to the scores, each module
    capped at its full rank ``full * groups`` (the excess is shared again among the others); a
    module's rank is split evenly over its groups and rounded to a multiple of ``multiple``
    (at least one multiple, at most ``full``).
    """
    scores = scores.double().clamp_min(0)
    if scores.sum() <= 0:
        scores = torch.ones_like(scores)
    cap = float(full * groups)
    budget = ratio * cap * scores.numel()
    ranks = torch.zeros_like(scores)
    free = torch.ones_like(scores, dtype=torch.bool)
    while True:
        remaining = budget - ranks[~free].sum()
        total = scores[free].sum()
        share = torch.where(free, remaining * scores / total if total > 0 else remaining / free.sum(), ranks)
        over = free & (share >= cap)
        ranks = torch.where(free, share.clamp(max=cap), ranks)
        if not over.any():
            break
        free &= ~over
        if not free.any():
            break
    per_group = ranks / groups
    step = min(multiple, full)
    rounded = (per_group / step).round().clamp_min(1) * step
    return rounded.clamp(max=full).long()


def exact_factors(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless factors at the group's output width: ``up`` = identity, ``down`` = the weight."""
    o = weight.shape[0] // groups
    up = torch.eye(o, dtype=torch.float32, device=weight.device).expand(groups, o, o).clone()
    return up, weight.float().clone()


def uniform_rank(full: int, ratio: float, multiple: int) -> int:
    """The same rank for every group: ``ratio`` of ``full``, rounded to a multiple of ``multiple``
    (at least one multiple, at most ``full``)."""
    return int(min(full, max(min(multiple, full), round(ratio * full / multiple) * multiple)))


def layer_factors(index: int, module, groups: int, ranks, s: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Factors of one attention module's ``k_proj`` and ``v_proj`` at per-group ranks ``ranks`` (K, V),
    whitened by ``s`` when given, keyed as in :class:`PaluConfig` (``"{index}.k.up"``, ...), on the CPU."""
    layer = {}
    for side, proj, rank in (("k", module.k_proj, ranks[0]), ("v", module.v_proj, ranks[1])):
        weight = proj.weight.detach()
        up, down = factorize(weight, groups, int(rank), None if s is None else s.to(weight.device))
        layer[f"{index}.{side}.up"], layer[f"{index}.{side}.down"] = up.cpu(), down.cpu()
    return layer


def dense_weight(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The projection weight ``[G * o, hidden]`` that factors ``up [G, o, r]`` / ``down [G * r, hidden]`` compute."""
    rank = up.shape[-1]
    return torch.cat([up[g] @ down[g * rank:(g + 1) * rank] for g in range(up.shape[0])])


def factors_from_weights(model, group_size: int, ratio: float = 1.0, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Factors made from the weights alone (no data): exact at ``ratio=1`` (when the groups' output
    width fits the hidden size), else plain truncated SVD with the same rank everywhere."""
    info = describe(model)
    gs, groups = head_groups(info.shape.num_kv_heads, group_size)
    factors = {}
    for i, module in enumerate(info.attention_modules):
        for side, proj in (("k", module.k_proj), ("v", module.v_proj)):
            weight = proj.weight.detach()
            full = min(weight.shape[0] // groups, weight.shape[1])
            if ratio >= 1.0 and full == weight.shape[0] // groups:
                up, down = exact_factors(weight, groups)
            else:
                up, down = factorize(weight, groups, uniform_rank(full, ratio, multiple))
            factors[f"{i}.{side}.up"], factors[f"{i}.{side}.down"] = up.cpu(), down.cpu()
    return factors


# -- the statistics pass --------------------------------------------------------------------------


def calibration_batches(tokenizer, count: int, length: int, seed: int, haystack=None) -> list[torch.Tensor]:
    """``count`` sequences of ``length`` tokens cut from the haystack text at random offsets."""
    text = read_haystack(haystack)
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        tokens: list[int] = []
        while len(tokens) < length:
            start = rng.randrange(max(1, len(text) - 16))
            tokens += tokenizer.encode(text[start:start + 2 * (length - len(tokens)) + 64], add_special_tokens=False)
        out.append(torch.tensor([tokens[:length]]))
    return out


def collect_statistics(model, batches, fisher: bool, progress: bool = True, snapshots=None):
    """``xtx [L, hidden, hidden]`` (fp32 sum over tokens of each attention input's outer product) and,
    with ``fisher``, ``fisher [L, 2]``: per module (K, V), the mean over weights of
    ``sqrt(mean over samples of grad^2)`` of the LM loss.

    ``snapshots``: sample counts (e.g. ``[4, 16]``); then the result is ``{n: statistics of the first n
    samples}`` for each count, from the same single pass (how much calibration text is enough)."""
    info = describe(model)
    modules = info.attention_modules
    hidden = modules[0].k_proj.weight.shape[1]
    device = modules[0].k_proj.weight.device
    xtx = torch.zeros(len(modules), hidden, hidden, dtype=torch.float32, device=device)
    grad2 = [[torch.zeros_like(m.k_proj.weight, dtype=torch.float32), torch.zeros_like(m.v_proj.weight, dtype=torch.float32)]
             for m in modules] if fisher else None

    def accumulate(index):
        def hook(_module, args):
            x = args[0].detach().flatten(0, -2).float()
            xtx[index].addmm_(x.T, x)
        return hook

    def summary(count):
        stats = {"xtx": xtx.cpu().clone()}
        if fisher:
            stats["fisher"] = torch.tensor([[g.div(count).sqrt().mean().item() for g in pair] for pair in grad2])
        return stats

    taken = {}
    handles = [m.k_proj.register_forward_pre_hook(accumulate(i)) for i, m in enumerate(modules)]
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in trainable:
            p.requires_grad_(False)
        if fisher:
            for m in modules:
                m.k_proj.weight.requires_grad_(True)
                m.v_proj.weight.requires_grad_(True)
        for count, ids in enumerate(tqdm(batches, desc="palu statistics", disable=not progress), 1):
            ids = ids.to(device)
            if fisher:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                for i, m in enumerate(modules):
                    for j, proj in enumerate((m.k_proj, m.v_proj)):
                        grad2[i][j] += proj.weight.grad.float().pow(2)
                        proj.weight.grad = None
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
            if snapshots is not None and count in snapshots:
                taken[count] = summary(count)
    finally:
        for h in handles:
            h.remove()
        for p, flag in trainable:
            p.requires_grad_(flag)
    if snapshots is not None:
        missing = sorted(set(snapshots) - set(taken))
        if missing:
            raise ValueError(f"snapshots {missing} exceed the {len(batches)} calibration samples; give more samples")
        return taken
    return summary(len(batches))


# -- the whole calibration ------------------------------------------------------------------------


def calibrate_palu(model, tokenizer, out=None, options: PaluCalibration = PaluCalibration(), haystack=None,
                   progress: bool = True, stats: dict | None = None) -> PaluConfig:
    """Calibrate Palu factors for ``model`` (module docstring); save them to ``out`` (a folder) if given.
    ``stats``: the statistics pass's result (:func:`collect_statistics`, with ``fisher`` when the
    allocation needs it) made for the same model and data, reused instead of a new pass (a sweep
    over group sizes and ratios needs one pass)."""
    info = describe(model)
    shape = info.shape
    gs, groups = head_groups(shape.num_kv_heads, options.group_size)
    hidden = info.attention_modules[0].k_proj.weight.shape[1]
    full = min(gs * shape.head_dim, hidden)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and options.seq_len > limit:
        raise ValueError(f"--seq-len {options.seq_len} exceeds the model's max_position_embeddings ({limit})")

    partial = Path(str(out) + ".partial") if out is not None else None
    record = {**asdict(options), "model_shape": shape.to_dict(), "haystack": [str(h) for h in haystack or []]}
    if partial is not None:
        meta = partial / "options.json"
        if partial.exists() and (not meta.is_file() or json.loads(meta.read_text()) != record):
            shutil.rmtree(partial)  # other options: start over
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(record)))

    stats_file = partial / "stats.safetensors" if partial is not None else None
    if stats is not None:
        if options.allocation == "fisher" and "fisher" not in stats:
            raise ValueError("the statistics given to calibrate_palu have no Fisher scores; collect them with fisher=True")
    elif stats_file is not None and stats_file.is_file():
        stats = load_file(str(stats_file))
    elif options.needs_data:
        batches = calibration_batches(tokenizer, options.samples, options.seq_len, options.seed, haystack)
        stats = collect_statistics(model, batches, fisher=options.allocation == "fisher", progress=progress)
        if stats_file is not None:
            atomic_write(stats_file, lambda tmp: save_file(stats, tmp))
    else:
        stats = {}

    scores = stats.get("fisher") if options.allocation == "fisher" else None
    if scores is None:
        scores = torch.ones(shape.num_layers, 2)
    ranks = allocate_ranks(scores, full, groups, options.ratio, options.multiple)

    factors = {}
    for i in tqdm(range(shape.num_layers), desc="palu factors", disable=not progress):
        layer_file = partial / f"layer_{i}.safetensors" if partial is not None else None
        if layer_file is not None and layer_file.is_file():
            factors.update(load_file(str(layer_file)))
            continue
        module = info.attention_modules[i]
        s = whitening(stats["xtx"][i].to(module.k_proj.weight.device)) if options.decomposition == "whiten" else None
        layer = layer_factors(i, module, groups, ranks[i], s)
        if layer_file is not None:
            atomic_write(layer_file, lambda tmp, layer=layer: save_file(layer, tmp))
        factors.update(layer)

    record["ranks"] = {"k": ranks[:, 0].tolist(), "v": ranks[:, 1].tolist()}
    if "fisher" in stats:
        record["fisher"] = stats["fisher"].tolist()
    config = PaluConfig(factors=factors, group_size=gs, model_shape=shape, calibration=record)
    if out is not None:
        config.save(out)
        shutil.rmtree(partial, ignore_errors=True)
    return config


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvpress-calibrate palu``."""
    parser.add_argument("--model", required=True, help="local model folder (transformers format)")
    parser.add_argument("--out", required=True, help="config folder to write (palu.json + palu.safetensors)")
    parser.add_argument("--tokenizer", help="tokenizer folder, if not the model's")
    parser.add_argument("--haystack", nargs="*", help="calibration text files (.txt or .gz); default: the bundled corpus")
    defaults = PaluCalibration()
    parser.add_argument("--ratio", type=float, default=defaults.ratio, help="kept fraction of the full rank (0.5 = Palu-50%%)")
    parser.add_argument("--group-size", type=int, default=defaults.group_size, help="KV heads per head group")
    parser.add_argument("--allocation", choices=["fisher", "uniform"], default=defaults.allocation)
    parser.add_argument("--decomposition", choices=["whiten", "svd"], default=defaults.decomposition)
    parser.add_argument("--multiple", type=int, default=defaults.multiple, help="round per-group ranks to this multiple")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per calibration sequence")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    """Run ``kvpress-calibrate palu`` with parsed ``args``; returns the exit status."""
    from .cli import load_model_and_tokenizer

    try:
        options = PaluCalibration(ratio=args.ratio, group_size=args.group_size, allocation=args.allocation,
                                  decomposition=args.decomposition, multiple=args.multiple, samples=args.samples,
                                  seq_len=args.seq_len, seed=args.seed)
        model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype, args.tokenizer)
        started = time.perf_counter()
        config = calibrate_palu(model, tokenizer, out=args.out, options=options, haystack=args.haystack,
                                progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvpress-calibrate: error: {error}", file=sys.stderr)
        return 2
    ranks = config.ranks()
    print(f"wrote {args.out}: {config.num_layers} layers, groups of {config.group_size} KV heads, ranks per group "
          f"K {ranks['k']} V {ranks['v']}, {config.kept_ratio():.1%} of the K/V values kept "
          f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kvpress-calibrate palu", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
