"""kvpress-calibrate: make a method's per-model config file.

    kvpress-calibrate duo --model PATH --out duo.safetensors [options]

One sub-command per method; each is the module kvpress.calibration.<method>, which defines
add_arguments(parser) and main(args) -> int (and may define HELP, a one-line summary). A method
whose module is missing is left out; one whose module fails to import says why when called.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from kvpress.eval.cli import HelpFormatter, setup_logging, version_string

from .duo import calibrate_duo  # noqa: F401  (kvpress.calibration.cli.calibrate_duo is public API)

METHODS = ("duo", "minference", "palu", "less")


def load_model_and_tokenizer(path: str, device: str, dtype: str, tokenizer_path: str | None):
    """A causal LM (SDPA attention, eval mode, on ``device``) and its tokenizer; ValueError saying
    what to pass when either cannot be loaded. dtype "auto": bfloat16 on CUDA, float32 elsewhere."""
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


def method_modules() -> dict[str, object]:
    """name -> the method's calibration module, or the exception its import raised; methods whose
    module does not exist (or lacks add_arguments / main) are left out."""
    found = {}
    for name in METHODS:
        module_name = f"{__package__}.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # not written yet
            found[name] = error
            continue
        except Exception as error:  # a broken module must not break the other sub-commands
            found[name] = error
            continue
        if callable(getattr(module, "add_arguments", None)) and callable(getattr(module, "main", None)):
            found[name] = module
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpress-calibrate", formatter_class=HelpFormatter,
        description="Make a method's per-model config file (for kvpress.patch(model, METHOD, config=FILE)).",
        epilog="example:\n  kvpress-calibrate duo --model PATH --out duo.safetensors\n"
        "  kvpress-calibrate duo --help      (the options of one method)",
    )
    parser.add_argument("--version", action="version", version=version_string("kvpress-calibrate"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="METHOD")
    for name, module in method_modules().items():
        if isinstance(module, Exception):
            error = f"{type(module).__name__}: {module}"
            sub = commands.add_parser(name, help=f"(unavailable: {error})", formatter_class=HelpFormatter)
            sub.set_defaults(run=lambda args, error=error, name=name: unavailable(name, error))
            continue
        summary = getattr(module, "HELP", None) or " ".join((module.__doc__ or name).strip().split("\n\n")[0].split())
        summary = summary.replace("`", "")  # plain text in --help
        sub = commands.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    return parser


def unavailable(name: str, error: str) -> int:
    print(f"kvpress-calibrate: error: the {name} calibration could not be loaded ({error})", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """The kvpress-calibrate command; returns the sub-command's exit status."""
    args = build_parser().parse_args(argv)
    setup_logging()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
