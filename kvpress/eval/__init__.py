"""Evaluation harness: long-context retrieval tasks, accuracy grids, KV cache bytes, perplexity."""

from .harness import dense_cache_bytes, evaluate_task, heatmap, perplexity
from .tasks import TASKS, Sample, load_corpus, make_sample, score

__all__ = [
    "TASKS",
    "Sample",
    "dense_cache_bytes",
    "evaluate_task",
    "heatmap",
    "load_corpus",
    "make_sample",
    "perplexity",
    "score",
]
