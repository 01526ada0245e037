"""``kvpress-calibrate``: make a method's per-model config file.

    kvpress-calibrate duo --model PATH --out duo.safetensors [options]

Every option of the training defaults to the reference's value (``--help`` lists them).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from kvpress.adapters import describe
from kvpress.methods.duo import DuoConfig

from .data import PasskeyData, PasskeyRecipe, read_haystack
from .duo import DuoTraining, attention_mass_gates, make_config, train_gates


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


def load_model_and_tokenizer(path: str, device: str, dtype: str, tokenizer_path: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a causal LM from {path}: {error}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"no tokenizer could be loaded from {tokenizer_path or path} ({error}); calibration needs one: "
            "pass --tokenizer PATH"
        ) from None
    return model.to(device).eval(), tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpress-calibrate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    duo = commands.add_parser("duo", help="DuoAttention gates (retrieval vs streaming heads)")
    duo.add_argument("--model", required=True, help="local model folder (transformers format)")
    duo.add_argument("--out", required=True, help="config file to write (safetensors)")
    duo.add_argument("--tokenizer", help="tokenizer folder, if not the model's")
    duo.add_argument("--method", choices=["optimize", "attention-mass"], default="optimize",
                     help="optimize: the paper's training; attention-mass: quick scoring, no training")
    duo.add_argument("--pattern-dir", help="also write the reference format (full_attention_heads.tsv + config.json)")
    duo.add_argument("--haystack", nargs="*", help="haystack text files (.txt or .gz); default: the bundled corpus")
    duo.add_argument("--samples", type=int, default=8, help="samples scored by --method attention-mass")
    duo.add_argument("--sink", type=int, default=64, help="sink tokens recorded for deployment")
    duo.add_argument("--recent", type=int, default=256, help="recent tokens recorded for deployment")
    duo.add_argument("--sparsity", type=float, default=0.5, help="default fraction of streaming heads recorded")
    duo.add_argument("--seed", type=int, default=0)
    duo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    duo.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    duo.add_argument("--no-progress", action="store_true")
    for dataclass_type, prefix in ((DuoTraining, "train-"), (PasskeyRecipe, "")):
        for field in fields(dataclass_type):
            name = field.name.replace("_", "-")
            if name in ("sink", "recent"):
                name = prefix + name
            duo.add_argument(f"--{name}", type=type(field.default), default=field.default, dest=field.name,
                             help=f"(default {field.default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    training = DuoTraining(**{f.name: getattr(args, f.name) for f in fields(DuoTraining)})
    recipe = PasskeyRecipe(**{f.name: getattr(args, f.name) for f in fields(PasskeyRecipe)})
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype, args.tokenizer)
        started = time.perf_counter()
        config = calibrate_duo(
            model, tokenizer, out=args.out, method=args.method, training=training, recipe=recipe,
            haystack=args.haystack, samples=args.samples, sink=args.sink, recent=args.recent,
            sparsity=args.sparsity, seed=args.seed, pattern_dir=args.pattern_dir, progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"kvpress-calibrate: error: {error}", file=sys.stderr)
        return 2
    streaming = (~config.retrieval_heads()).float().mean().item()
    print(f"wrote {args.out}: gates for {config.gates.shape[0]} layers x {config.gates.shape[1]} KV heads, "
          f"{streaming:.0%} streaming at sparsity {config.sparsity} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
