"""Peak GPU memory of DuoAttention gate calibration on an 8B-shaped model (Llama-3-8B dimensions,
random bf16 weights) at 32K tokens: does one optimisation step fit on one 80 GB GPU?

    python benchmarks/calibration_memory.py --length 32768 --steps 2

Writes benchmarks/results/calibration_memory_<device>.json.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from kvpress.calibration.data import PasskeyRecipe, Sample  # noqa: E402
from kvpress.calibration.duo import DuoTraining, train_gates  # noqa: E402


class RandomTokens:
    """Stands in for PasskeyData: random tokens, the last `span` tokens supervised."""

    def __init__(self, length: int, span: int, vocab: int):
        self.recipe, self.seed = PasskeyRecipe(min_length=length, max_length=length, num_lengths=1), 0
        self.length, self.span, self.vocab = length, span, vocab

    def sample(self, index: int) -> Sample:
        generator = torch.Generator().manual_seed(index)
        supervised = torch.zeros(self.length, dtype=torch.bool)
        supervised[-self.span :] = True
        return Sample(torch.randint(0, self.vocab, (1, self.length), generator=generator), supervised)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--span", type=int, default=330, help="supervised tokens (10 passkeys of 32 words ~ 330)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    started = time.perf_counter()
    model = common.build_model("cuda", max_positions=131072)  # train_gates sets train mode and grads itself
    config = model.config
    build_seconds = time.perf_counter() - started
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    data = RandomTokens(args.length, args.span, config.vocab_size)
    started = time.perf_counter()
    gates = train_gates(model, data, DuoTraining(steps=args.steps), progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated()

    name = torch.cuda.get_device_name()
    result = {
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "model": "Llama-3-8B shape, random bf16 weights",
        "length": args.length, "steps": args.steps, "supervised_tokens": args.span,
        "weights_gib": weights / 2**30, "peak_gib": peak / 2**30,
        "device_total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "seconds_per_step": seconds / args.steps, "model_build_seconds": build_seconds,
        "gates_changed": bool((gates < 1).any()),
        "env": common.environment(),
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"calibration_memory_{name.split()[1].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
