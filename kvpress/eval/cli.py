"""kvpress-eval: long-context retrieval accuracy, KV cache bytes and perplexity of a model.

    kvpress-eval --model models/needle-llama --tasks passkey,multikey,ppl \\
        --lengths 1024,2048,4096,8192 --depths 11 --samples 4 --out results.json --heatmap passkey.png

Add --method NAME (any kvpress method or a composition such as minference+duo), --config FILE (or
NAME=FILE per composed method) and --option FIELD=VALUE to evaluate the model patched by kvpress;
--duo-config FILE is short for --method duo --config FILE.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .harness import evaluate_task, heatmap, perplexity
from .tasks import TASKS, load_corpus, make_sample

EXAMPLE = __doc__.split("\n\n", 1)[1]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the usage example kept as written and every option's default shown (options
    whose default is None or a flag say in their own help what happens without them)."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if "default" in help or default is None or default is False or default == argparse.SUPPRESS or not action.option_strings:
            return help
        return help + " (default: %(default)s)"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """Show kvpress's log lines (INFO and up) on stderr as ``kvpress: message`` (for the commands)."""
    logger = logging.getLogger("kvpress")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def version_string(prog: str) -> str:
    from kvpress import __version__

    return f"{prog} (kvpress {__version__})"


@dataclass
class EvalConfig:
    """What to evaluate. Lengths in tokens; depths as fractions of the haystack."""

    tasks: list[str] = field(default_factory=lambda: ["passkey", "multikey", "multivalue", "kvlookup", "ppl"])
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    samples: int = 2  # per (length, depth) cell
    seed: int = 0
    num_needles: int | None = None  # None: the task's default (tasks.DEFAULT_NEEDLES)
    haystack: str = "heldout"  # "heldout", "train" (bundled corpus) or a path to a text file
    ppl_text: str = "heldout"  # same choices
    ppl_context: int = 2048
    ppl_tokens: int = 65536
    progress: bool = True
    chat: bool = False  # wrap prompts in the tokenizer's chat template (instruction models)


def read_text(name: str) -> str:
    """The bundled corpus split `name`, or the contents of the file `name`."""
    if name in ("heldout", "train"):
        return load_corpus(name)
    with open(name, encoding="utf-8") as f:
        return f.read()


def run_eval(model, tokenizer, cfg: EvalConfig) -> dict:
    """Evaluate `model` on `cfg`; returns a JSON-ready dict {task: result, "ppl": ...}."""
    results = {}
    haystack = read_text(cfg.haystack)
    for task in cfg.tasks:
        t0 = time.time()
        if task == "ppl":
            results["ppl"] = perplexity(
                model, tokenizer, read_text(cfg.ppl_text), cfg.ppl_context, cfg.ppl_tokens, cfg.progress
            )
        else:
            r = evaluate_task(
                model,
                tokenizer,
                task,
                haystack,
                cfg.lengths,
                cfg.depths,
                cfg.samples,
                cfg.seed,
                cfg.num_needles,
                cfg.progress,
                chat=cfg.chat,
            )
            results[task] = r.to_dict()
        results[task]["seconds"] = round(time.time() - t0, 2)
    return results


def load_model(path: str, device: str, dtype: str, tokenizer=None):
    """Model and tokenizer from a local folder or hub name (offline if cached), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer


@dataclass
class PatchSpec:
    """How to patch the model for an evaluation: ``kvpress.patch(model, method, config, **options)``."""

    method: str
    config: str | dict[str, str] | None = None  # a config file, or method name -> file when composing
    options: dict = field(default_factory=dict)  # config fields to override (e.g. sparsity=0.75)

    def apply(self, model):
        """Patch ``model``; returns the runtime's config of the method that keeps the cache."""
        import kvpress

        kvpress.patch(model, self.method, config=self.config, **self.options)
        return model._kvpress_patch.method.config


def parse_option(text: str) -> tuple[str, object]:
    """"sparsity=0.75" -> ("sparsity", 0.75): the value as a Python literal, else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def patch_spec(parser: argparse.ArgumentParser, a) -> PatchSpec | None:
    """The PatchSpec the arguments ask for (None: unpatched); parser.error on a bad combination."""
    if a.duo_config is None and (a.duo_sparsity is not None or a.duo_threshold is not None):
        parser.error("--duo-sparsity / --duo-threshold need --duo-config FILE")
    if a.duo_sparsity is not None and a.duo_threshold is not None:
        parser.error("give --duo-sparsity or --duo-threshold, not both")
    for name in ("duo_sparsity", "duo_threshold"):
        value = getattr(a, name)
        if value is not None and not 0.0 <= value <= 1.0:
            parser.error(f"argument --{name.replace('_', '-')}: must be in [0, 1], got {value}")
    if a.duo_config is not None:
        if a.method not in (None, "duo") or a.config:
            parser.error("--duo-config is short for --method duo --config FILE; give one form")
        if not os.path.exists(a.duo_config):
            parser.error(f"argument --duo-config: {a.duo_config} not found; make one with "
                         f"`kvpress-calibrate duo --model {a.model} --out {a.duo_config}`")
        a.method, a.config = "duo", [a.duo_config]
        a.option = [*a.option, *(f"{k}={v}" for k, v in (("sparsity", a.duo_sparsity),
                                                          ("threshold", a.duo_threshold)) if v is not None)]
    if a.method is None:
        if a.config or a.option:
            parser.error("--config / --option need --method NAME")
        return None
    import kvpress

    names = a.method.split("+")
    if unknown := [n for n in names if n not in kvpress.METHODS]:
        parser.error(f"argument --method: unknown method(s) {','.join(unknown)}; choose from {','.join(kvpress.METHODS)} "
                     "or a composition such as minference+duo")
    configs = {}
    for item in a.config:
        name, path = ("", item) if len(names) == 1 else item.partition("=")[::2]
        if len(names) > 1 and name not in names:
            parser.error(f"argument --config: with --method {a.method}, give METHOD=FILE (METHOD one of {', '.join(names)})")
        if not os.path.exists(path):
            parser.error(f"argument --config: {path} not found; make one with "
                         f"`kvpress-calibrate {name or names[0]} --model {a.model} --out {path}`")
        configs[name] = path
    if len(names) == 1 and len(configs) > 1:
        parser.error("argument --config: give one config file for one method")
    try:
        options = dict(parse_option(o) for o in a.option)
    except ValueError as error:
        parser.error(f"argument --option: {error}")
    config = configs.get("") if len(names) == 1 else (configs or None)
    return PatchSpec(a.method, config, options)


def duo_summary(config) -> dict | None:
    """The settings of a DuoConfig and its binarised retrieval-head mask, as JSON (None for another config)."""
    import kvpress

    if not isinstance(config, kvpress.DuoConfig):
        return None
    heads = config.retrieval_heads()
    return {
        "sink": config.sink,
        "recent": config.recent,
        "sparsity": config.sparsity,
        "threshold": config.threshold,
        "retrieval_heads": heads.int().tolist(),
        "retrieval_fraction": heads.float().mean().item(),
    }


def method_label(report: dict) -> str:
    """One line naming the method and its settings, e.g. for a heatmap title."""
    duo, spec = report.get("duo"), report.get("method")
    if duo is not None:
        heads = [x for row in duo["retrieval_heads"] for x in row]
        split = f"sparsity {duo['sparsity']}" if duo["sparsity"] is not None else f"threshold {duo['threshold']}"
        return (f"DuoAttention: {sum(heads)} of {len(heads)} KV heads retrieval ({split}), "
                f"streaming sink {duo['sink']} + recent {duo['recent']}")
    if spec is not None:
        options = ", ".join(f"{k}={v}" for k, v in spec["options"].items())
        return f"kvpress {spec['method']}" + (f" ({options})" if options else "")
    return "unpatched (dense KV cache)"


def environment(model) -> dict:
    """Versions and device, recorded with every result."""
    import transformers

    dev = model.device
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": str(model.dtype),
    }


def parse_list(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x]


def parse_depths(text: str) -> list[float]:
    """"11": eleven evenly spaced depths in [0, 1]; "0,0.5,1": those depths."""
    if text.isdigit():
        n = int(text)
        return [round(i / max(n - 1, 1), 4) for i in range(n)]
    return parse_list(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvpress-eval", formatter_class=HelpFormatter, epilog="example:\n" + EXAMPLE,
        description="Long-context retrieval accuracy, KV cache bytes and perplexity of a causal LM, "
        "unpatched or patched by kvpress.",
    )
    all_tasks = ",".join(TASKS + ("ppl",))
    p.add_argument("--version", action="version", version=version_string("kvpress-eval"))
    p.add_argument("--model", required=True, help="model folder (or a hub name already in the local cache); required")
    p.add_argument("--tasks", default=all_tasks, help=f"comma-separated tasks, any of {all_tasks}")
    p.add_argument("--lengths", default="1024,2048,4096,8192",
                   help="comma-separated context lengths in tokens (each at most the model's max_position_embeddings)")
    p.add_argument("--depths", default="11",
                   help="a count of evenly spaced needle depths in [0, 1] (11), or a comma-separated list (0,0.5,1)")
    p.add_argument("--samples", type=int, default=2, help="samples per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (a sample is a pure function of it)")
    p.add_argument("--num-needles", type=int, default=None,
                   help="keys / values / pairs per sample (default: the task's own: passkey 1, multikey 4, "
                   "multivalue 4, kvlookup 16)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template (instruction models; default: plain text)")
    p.add_argument("--haystack", default="heldout", help="haystack text: 'heldout', 'train' (bundled) or a text file")
    p.add_argument("--ppl-text", default="heldout", help="perplexity text: 'heldout', 'train' (bundled) or a text file")
    p.add_argument("--ppl-context", type=int, default=2048, help="perplexity window in tokens")
    p.add_argument("--ppl-tokens", type=int, default=65536, help="tokens of --ppl-text scored for perplexity")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model weights' dtype")
    p.add_argument("--method", default=None,
                   help="evaluate the model patched by this kvpress method, or a composition such as minference+duo "
                   "(default: unpatched)")
    p.add_argument("--config", action="append", default=[],
                   help="with --method: the method's config file or folder (kvpress-calibrate makes them); when "
                   "composing, METHOD=FILE, repeatable (default: the method's own default config)")
    p.add_argument("--option", action="append", default=[],
                   help="with --method: FIELD=VALUE overriding a config field, e.g. sparsity=0.75 or recent=256; "
                   "repeatable (default: none)")
    p.add_argument("--duo-config", default=None,
                   help="short for --method duo --config FILE (default: unpatched)")
    p.add_argument("--duo-sparsity", type=float, default=None,
                   help="with --duo-config: fraction of streaming KV heads, in [0, 1] (default: the config's)")
    p.add_argument("--duo-threshold", type=float, default=None,
                   help="with --duo-config: gate at or above which a head is a retrieval head (default: the config's)")
    p.add_argument("--out", default=None, help="write the results JSON here (default: print only)")
    p.add_argument("--heatmap", default=None,
                   help="write the passkey accuracy heatmap PNG here; needs matplotlib (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    return p


def check_args(parser: argparse.ArgumentParser, a) -> tuple[EvalConfig, PatchSpec | None, object]:
    """Validate the arguments before any model weights load; parser.error (exit 2, one line) on the
    first problem. Returns the EvalConfig, how to patch the model (None: unpatched) and the tokenizer."""
    tasks = [t for t in a.tasks.split(",") if t]
    if unknown := [t for t in tasks if t not in TASKS + ("ppl",)]:
        parser.error(f"argument --tasks: unknown task(s) {','.join(unknown)}; choose from {','.join(TASKS + ('ppl',))}")
    if not tasks:
        parser.error("argument --tasks: give at least one task")
    try:
        lengths = parse_list(a.lengths, int)
        depths = parse_depths(a.depths)
    except ValueError as error:
        parser.error(f"argument --lengths/--depths: {error}")
    if not lengths or min(lengths) < 1:
        parser.error(f"argument --lengths: give positive token counts, got {a.lengths!r}")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        parser.error(f"argument --depths: depths are fractions in [0, 1], got {a.depths!r}")
    for name in ("samples", "ppl_context", "ppl_tokens"):
        if getattr(a, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be at least 1")
    if a.num_needles is not None and a.num_needles < 1:
        parser.error("argument --num-needles: must be at least 1")
    for name in ("haystack", "ppl_text"):
        value = getattr(a, name)
        if value not in ("heldout", "train") and not os.path.isfile(value):
            parser.error(f"argument --{name.replace('_', '-')}: {value!r} is neither 'heldout', 'train' nor a file")
    spec = patch_spec(parser, a)
    if a.heatmap:
        if "passkey" not in tasks:
            parser.error("argument --heatmap: it draws the passkey grid; add passkey to --tasks")
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("argument --heatmap: needs matplotlib; `pip install matplotlib` (or kvpress[eval])")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"argument --device: {a.device} asked but torch sees no CUDA GPU; use --device cpu")

    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(a.model)
    except (OSError, ValueError) as error:
        parser.error(f"argument --model: cannot read a model config from {a.model}: {str(error).splitlines()[0]}")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "max_position_embeddings", None)
    if window is not None:
        if max(lengths) > window:
            parser.error(f"argument --lengths: {max(lengths)} exceeds the model's max_position_embeddings ({window})")
        if "ppl" in tasks and a.ppl_context > window:
            parser.error(f"argument --ppl-context: {a.ppl_context} exceeds the model's max_position_embeddings ({window})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(a.model)
    except (OSError, ValueError) as error:
        parser.error(f"argument --model: cannot load a tokenizer from {a.model}: {str(error).splitlines()[0]}")
    if a.chat and not getattr(tokenizer, "chat_template", None):
        parser.error(f"argument --chat: the tokenizer of {a.model} has no chat template")
    haystack = read_text(a.haystack)
    for task in tasks:
        if task != "ppl":
            try:
                make_sample(task, tokenizer, haystack, min(lengths), 0.5, seed=0, num_needles=a.num_needles,
                            chat=a.chat)
            except ValueError as error:
                parser.error(f"argument --lengths: {error}")
    cfg = EvalConfig(
        tasks=tasks, lengths=lengths, depths=depths, samples=a.samples, seed=a.seed, num_needles=a.num_needles,
        haystack=a.haystack, ppl_text=a.ppl_text, ppl_context=a.ppl_context, ppl_tokens=a.ppl_tokens,
        progress=not a.no_progress, chat=a.chat,
    )
    return cfg, spec, tokenizer


def run(argv=None) -> dict:
    """Parse `argv`, evaluate, print a summary (and write --out / --heatmap); returns the report."""
    parser = build_parser()
    a = parser.parse_args(argv)
    cfg, spec, tokenizer = check_args(parser, a)
    setup_logging()
    torch.manual_seed(a.seed)
    model, tokenizer = load_model(a.model, a.device, a.dtype, tokenizer)
    method_config = spec.apply(model) if spec is not None else None
    t0 = time.time()
    results = run_eval(model, tokenizer, cfg)
    report = {
        "model": a.model,
        "method": asdict(spec) if spec is not None else None,
        "duo_config": a.duo_config,
        "duo": duo_summary(method_config),
        "config": asdict(cfg),
        "environment": environment(model),
        "seconds": round(time.time() - t0, 2),
        "results": results,
    }
    for task, r in results.items():
        if task == "ppl":
            print(f"ppl       perplexity {r['perplexity']:.3f}  bits/byte {r['bits_per_byte']:.3f}  ({r['tokens']} tokens)")
        else:
            by_len = "  ".join(f"{n}:{100 * v:.0f}%" for n, v in r["by_length"].items())
            n_max = max(r["cache_bytes"])
            ratio = r["cache_bytes"][n_max] / r["dense_cache_bytes"][n_max]
            print(f"{task:<10}{100 * r['accuracy']:5.1f}%  [{by_len}]  KV bytes at {n_max}: {ratio:.2f} of dense")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    if a.heatmap:
        name = Path(os.path.abspath(a.model)).name if os.path.isdir(a.model) else a.model
        r = results["passkey"]
        title = f"passkey on {name}: {100 * r['accuracy']:.1f}%\n{method_label(report)}"
        heatmap(r, a.heatmap, title=title)
    return report


def main(argv=None) -> int:
    """The kvpress-eval command: 0 on success (argument errors exit 2 before the model loads)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
