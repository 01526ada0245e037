"""Evaluation of any Hugging Face causal LM (patched by kvpress or not) on long-context tasks.

- `evaluate_task`: accuracy of greedy answers on a grid of lengths x depths (tasks.py), with the
  KV cache bytes the model held at the end of each answer next to what a dense cache would hold.
- `perplexity`: exp(mean next-token negative log-likelihood) on a text, in windows of a fixed
  number of tokens.
- `heatmap`: accuracy over lengths x depths as a PNG (needs matplotlib; optional).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..cache import kv_cache_bytes
from .tasks import Sample, make_sample, score


def dense_cache_bytes(model, tokens: int, batch: int = 1) -> int:
    """Bytes of an unpatched (dense) KV cache for `tokens` tokens: 2 (K and V) x layers x KV heads
    x head dim x tokens x batch x bytes per element of the model's dtype."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elem = torch.finfo(model.dtype).bits // 8
    return 2 * c.num_hidden_layers * kv_heads * head_dim * tokens * batch * elem


def folds_leading_space(tokenizer) -> bool:
    """True for tokenizers that merge a word's leading space into its first token (BPE, SentencePiece):
    a prompt ending in a space is then an unnatural token boundary."""
    return len(tokenizer.encode(" pass", add_special_tokens=False)) == len(tokenizer.encode("pass", add_special_tokens=False))


@torch.no_grad()
def answer(model, tokenizer, sample: Sample) -> tuple[str, int, int]:
    """Greedy-decode as many tokens as the answer has; returns (text, cache bytes, tokens cached).

    A prompt that ends in a space ("The pass key is ") leaves that space to the model when the
    tokenizer folds leading spaces into words (the answer is then " 1234567"); byte-level
    tokenizers read the prompt as it is."""
    prompt, expected = sample.prompt, sample.answer
    if prompt.endswith(" ") and folds_leading_space(tokenizer):
        prompt, expected = prompt[:-1], " " + expected
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not sample.chat).input_ids.to(model.device)
    n_new = len(tokenizer.encode(expected, add_special_tokens=False))
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    new = out.sequences[0, ids.shape[1] :]
    # The last generated token is never fed back, so the cache holds all but one token.
    return tokenizer.decode(new, skip_special_tokens=True), kv_cache_bytes(out['cache'] if 'cache' in out else out['past_key_values']), out.sequences.shape[1] - 1


@dataclass
class TaskResult:
    """Per-task result: mean score overall and per (length, depth) cell, and cache sizes."""

    task: str
    accuracy: float
    grid: dict  # {length: {depth: mean score}}
    by_length: dict  # {length: mean score}
    cache_bytes: dict  # {length: mean bytes held by the model's cache after answering}
    dense_cache_bytes: dict  # {length: bytes a dense cache of the same tokens would hold}
    examples: list  # a few (prompt tail, answer, prediction) for inspection
    scores: list  # every cell's score: [length, depth, sample, score] (to compare two runs cell by cell)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_task(
    model,
    tokenizer,
    task: str,
    haystack: str,
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int = 0,
    num_needles: int | None = None,
    progress: bool = True,
    chat: bool = False,
) -> TaskResult:
    """Score `samples` instances of `task` per (length, depth) cell; deterministic for a seed.
    chat: prompts in the tokenizer's chat template (see tasks.make_sample)."""
    cells = [(n, d, i) for n in lengths for d in depths for i in range(samples)]
    grid, by_len, mem, examples, scores = {}, {}, {}, [], []
    for n, d, i in tqdm(cells, desc=task, disable=not progress, leave=False):
        s = make_sample(task, tokenizer, haystack, n, d, seed=f"{seed}/{i}", num_needles=num_needles, chat=chat)
        pred, nbytes, ntok = answer(model, tokenizer, s)
        sc = score(s, pred)
        scores.append([n, d, i, sc])
        grid.setdefault(n, {}).setdefault(d, []).append(sc)
        mem.setdefault(n, []).append((nbytes, dense_cache_bytes(model, ntok)))
        if len(examples) < 3 or (sc < 1 and len(examples) < 8):
            examples.append({"length": n, "depth": d, "answer": s.answer, "prediction": pred, "score": sc})
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for n, row in grid.items():
        by_len[n] = mean([x for xs in row.values() for x in xs])
        grid[n] = {d: mean(xs) for d, xs in row.items()}
    return TaskResult(
        task=task,
        accuracy=mean(list(by_len.values())),
        grid=grid,
        by_length=by_len,
        cache_bytes={n: mean([b for b, _ in v]) for n, v in mem.items()},
        dense_cache_bytes={n: mean([b for _, b in v]) for n, v in mem.items()},
        examples=examples,
        scores=scores,
    )


@torch.no_grad()
def perplexity(model, tokenizer, text: str, context: int = 2048, max_tokens: int = 65536, progress: bool = True) -> dict:
    """Perplexity exp(mean NLL per predicted token) over non-overlapping windows of `context`
    tokens (each window starts fresh, with BOS where the tokenizer adds one), on the first
    `max_tokens` tokens of `text`. Also returns the NLL in nats per token and bits per byte."""
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)[:max_tokens]
    prefix = tokenizer.encode("", add_special_tokens=True)
    step = context - len(prefix)
    nll, count, nbytes = 0.0, 0, 0
    for start in tqdm(range(0, len(ids) - 1, step), desc="perplexity", disable=not progress, leave=False):
        chunk = ids[start : start + step]
        if len(chunk) < 2:
            break
        x = torch.tensor([prefix + chunk], device=model.device)
        logits = model(x).logits[0, len(prefix) - 1 if prefix else 0 : -1].float()
        target = x[0, len(prefix) if prefix else 1 :]
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
        nbytes += len(tokenizer.decode(target).encode("utf-8"))
    return {
        "perplexity": math.exp(nll / count),
        "nll_per_token": nll / count,
        "bits_per_byte": nll / nbytes / math.log(2),
        "tokens": count,
        "context": context,
    }


def length_label(tokens: int) -> str:
    """1024 -> "1K", 1536 -> "1.5K", 300 -> "300" (tokens)."""
    tokens = int(tokens)
    return f"{tokens / 1024:g}K" if tokens >= 1024 and tokens % 256 == 0 else str(tokens)


def heatmap(result: dict, path: str, title: str = "") -> bool:
    """Draw a TaskResult dict's grid (needle depth rows x context length columns, accuracy in % in
    each cell) to `path`; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = sorted(result["grid"], key=int)
    depths = sorted({d for row in result["grid"].values() for d in row}, key=float)
    z = [[result["grid"][n][d] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(3.0 + 0.9 * len(lengths), 1.6 + 0.38 * len(depths)))
    im = ax.imshow(z, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * float(d):.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (0% = start)")
    for i, row in enumerate(z):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=9, color="black")
    ax.set_title(title or f"{result['task']}: {100 * result['accuracy']:.1f}%", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
