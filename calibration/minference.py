"""MInference kernel-aware pattern search (Jiang et al., 2024, arXiv 2407.02490, section 3.2).

    kvpress-calibrate minference --model PATH --out minference.safetensors [options]

For every layer and query head, each candidate pattern (candidates of about equal kernel cost) is
scored by the attention mass it recovers: on calibration samples, dense attention runs as usual and,
for the queries past ``start``, the softmax probabilities are summed over the keys each candidate's
index (built from the input exactly as at run time) keeps. Each head gets its best candidate. Scores
are computed a chunk of queries at a time: the full attention matrix is never held.

Defaults are the reference's: one 30K-token sample of text with passkeys (here from the bundled
corpus), queries past position 2500, candidates A-shape (100, 800); VS (30, 800), (100, 750),
(500, 700), (3500, 100); block-sparse keeping 1/8 of the key blocks. For a model whose context is
shorter than the sample, the sample is cut to the model's context and the start position and the
candidates' token budgets are scaled by the same factor (``--no-scale`` keeps them).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpress.adapters import describe
from kvpress.api import attention_override
from kvpress.kernels import minference_reference as R
from kvpress.kernels.reference import rank_mask
from kvpress.methods.minference import MInferenceConfig

from .data import PasskeyData, PasskeyRecipe, read_haystack

REFERENCE_LENGTH = 30000  # tokens of the reference's calibration sample
REFERENCE_START = 2500  # queries scored: those past this position
CANDIDATES = "ashape:100:800,vs:30:800,vs:100:750,vs:500:700,vs:3500:100,block:1/8"
NAMES = {"vs": "vertical_and_slash", "ashape": "stream_llm", "block": "block_sparse"}


def parse_candidates(text: str) -> list[tuple[str, float, float]]:
    """``"vs:A:B"`` (columns, diagonals), ``"ashape:A:B"`` (sinks, recent), ``"block:K"`` (key blocks)
    or ``"block:1/N"`` (a fraction of the blocks, stored as ``-1/N``), comma-separated."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            if parts[0] == "block" and len(parts) == 2:
                num, _, den = parts[1].partition("/")
                out.append(("block_sparse", -float(num) / float(den) if den else float(num), 0.0))
            elif parts[0] in ("vs", "ashape") and len(parts) == 3:
                out.append((NAMES[parts[0]], float(parts[1]), float(parts[2])))
            else:
                raise ValueError
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"bad candidate {item!r}: use vs:COLUMNS:DIAGONALS, ashape:SINK:RECENT, block:K "
                             "or block:1/N, comma-separated") from None
    return out


def scaled(candidates, factor: float) -> list[tuple[str, int, int]]:
    """Token budgets times ``factor`` (at least 1; VS at least 30 / 50); fractions of blocks stay."""
    out = []
    for name, a, b in candidates:
        if name == "block_sparse":
            out.append((name, a if a < 0 else max(1, round(a)), 0))
        else:
            a, b = max(1, round(a * factor)), max(1, round(b * factor))
            if name == "vertical_and_slash":
                a, b = max(a, R.MIN_VERTICAL), max(b, R.MIN_SLASH)
            out.append((name, a, b))
    return out


class PatternProbe:
    """Dense attention that also adds, per (layer, query head, candidate), the attention mass the
    candidate's index keeps for the queries past ``start``."""

    def __init__(self, num_layers, num_heads, candidates, start, score_bytes=1 << 28):
        self.candidates, self.start, self.score_bytes = candidates, start, score_bytes
        self.mass = torch.zeros(num_layers, num_heads, len(candidates), dtype=torch.float64)
        self.queries = 0  # scored queries per layer and head, summed over samples

    def resolved(self, name, a, b, length):
        if name == "block_sparse" and a < 0:  # a fraction of the key blocks
            return name, max(1, round(-a * ((length + R.BLOCK - 1) // R.BLOCK))), 0
        return name, int(a), int(b)

    def attention(self, module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                             enable_gqa=query.shape[1] != key.shape[1])
        B, H, L, _ = query.shape
        if L > self.start:
            self.mass[module.layer_idx] += self.score(query, key, scale, sliding_window).cpu()
        return out.transpose(1, 2), None

    @torch.no_grad()
    def score(self, q, k, scale, window):
        B, H, L, _ = q.shape
        Hkv = k.shape[1]
        rank = torch.arange(L, device=q.device, dtype=torch.int32)[None].expand(B, L)
        indices = []
        vertical = slash = None
        for name, a, b in (self.resolved(*c, L) for c in self.candidates):
            if name == "vertical_and_slash":
                if vertical is None:
                    vertical, slash = R.vs_scores(q, k, rank, rank, scale, window)
                sizes = [torch.full((H,), min(x, L), dtype=torch.long, device=q.device) for x in (a, b)]
                indices.append((name, R._top(vertical, sizes[0], rank.long()), R._top(slash, sizes[1], None)))
            elif name == "block_sparse":
                indices.append((name, R.block_index(q, k, rank, rank, a), None))
            else:
                indices.append((name, a, b))
        mass = torch.zeros(H, len(indices), dtype=torch.float64, device=q.device)
        chunk = max(R.BLOCK, self.score_bytes // (B * H * L * 4 * 3) // R.BLOCK * R.BLOCK)
        first = R.first_query_block(rank)
        for s in range(self.start, L, chunk):
            e = min(L, s + chunk)
            qr = rank[:, s:e]
            scores = torch.matmul(R._grouped(q[:, :, s:e], Hkv), k.transpose(-1, -2)).float()
            scores = scores.view(B, H, e - s, L) * scale
            allowed = R._rank_mask(qr, rank, window)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            for c, (name, x, y) in enumerate(indices):
                if name == "vertical_and_slash":
                    keep = R.vs_mask(qr, rank, x, y, window)
                elif name == "block_sparse":
                    keep = R.block_mask(qr, rank, x, window, first)
                else:
                    keep = rank_mask(qr, rank, x, y, window)
                mass[:, c] += (probs * keep).sum(dim=(0, 2, 3), dtype=torch.float64)
        return mass


@torch.no_grad()
def search_patterns(model, tokenizer, length: int | None = None, samples: int = 1, candidates: str = CANDIDATES,
                    start: int | None = None, scale: bool = True, haystack=None, num_passkeys: int = 4,
                    passkey_words: int = 8, seed: int = 0, progress: bool = True) -> MInferenceConfig:
    """Search every query head's pattern on ``samples`` samples of ``length`` tokens (default: the
    reference's 30K, cut to the model's context) and return the config (model shape recorded)."""
    shape = describe(model).shape
    context = getattr(model.config, "max_position_embeddings", None) or REFERENCE_LENGTH
    length = length or min(REFERENCE_LENGTH, context)
    if length > context:
        raise ValueError(f"--length {length} exceeds the model's max_position_embeddings ({context})")
    factor = min(1.0, length / REFERENCE_LENGTH) if scale else 1.0
    start = round(REFERENCE_START * factor) if start is None else start
    if not 0 <= start < length:
        raise ValueError(f"--start {start} must be below --length {length}")
    chosen = scaled(parse_candidates(candidates), factor)
    recipe = PasskeyRecipe(min_length=length, max_length=length, num_lengths=1, num_passkeys=num_passkeys,
                           passkey_words=passkey_words)
    data = PasskeyData(tokenizer, recipe, read_haystack(haystack), seed=seed)
    probe = PatternProbe(shape.num_layers, shape.num_heads, chosen, start)
    device = next(model.parameters()).device
    for index in tqdm(range(samples), disable=not progress, desc="minference pattern search"):
        with attention_override(model, probe):
            model.base_model(input_ids=data.sample(index).input_ids.to(device), use_cache=False)
    mass = probe.mass / (samples * (length - start))
    best = mass.argmax(-1)
    patterns = []
    for layer in range(shape.num_layers):
        row = {}
        for h in range(shape.num_heads):
            name, a, b = probe.resolved(*chosen[best[layer, h]], length)
            row[h] = (name, a, b)
        patterns.append(row)
    return MInferenceConfig(patterns=patterns, scores=mass.max(-1).values.float(), model_shape=shape)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``kvpress-calibrate minference`` options."""
    parser.add_argument("--model", required=True, help="local model folder (transformers format)")
    parser.add_argument("--out", required=True, help="config file to write (safetensors)")
    parser.add_argument("--tokenizer", help="tokenizer folder, if not the model's")
    parser.add_argument("--reference-json", help="also write the reference's JSON format here")
    parser.add_argument("--length", type=int, default=None,
                        help=f"tokens per sample (default {REFERENCE_LENGTH}, cut to the model's context)")
    parser.add_argument("--samples", type=int, default=1, help="calibration samples (default 1)")
    parser.add_argument("--candidates", default=CANDIDATES, help=f"candidate patterns (default {CANDIDATES})")
    parser.add_argument("--start", type=int, default=None,
                        help=f"score queries past this position (default {REFERENCE_START}, scaled like the budgets)")
    parser.add_argument("--no-scale", action="store_true",
                        help="keep the candidates' budgets and the start position unscaled for short samples")
    parser.add_argument("--haystack", nargs="*", help="haystack text files (.txt or .gz); default: the bundled corpus")
    parser.add_argument("--num-passkeys", type=int, default=4, help="passkeys hidden in each sample (default 4)")
    parser.add_argument("--passkey-words", type=int, default=8, help="words per passkey (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from .cli import load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype, args.tokenizer)
        started = time.perf_counter()
        config = search_patterns(model, tokenizer, length=args.length, samples=args.samples,
                                 candidates=args.candidates, start=args.start, scale=not args.no_scale,
                                 haystack=args.haystack, num_passkeys=args.num_passkeys,
                                 passkey_words=args.passkey_words, seed=args.seed, progress=not args.no_progress)
        config.save(args.out)
        if args.reference_json:
            config.save_reference_json(args.reference_json)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvpress-calibrate: error: {error}", file=sys.stderr)
        return 2
    counts = {}
    for layer in config.patterns:
        for name, a, b in layer.values():
            counts[(name, a, b)] = counts.get((name, a, b), 0) + 1
    summary = ", ".join(f"{name}({a}, {b}): {n}" for (name, a, b), n in sorted(counts.items(), key=lambda x: -x[1]))
    print(f"wrote {args.out}: {summary}; mean recovered mass {config.scores.mean():.3f} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kvpress-calibrate minference", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
