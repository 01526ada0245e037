"""Could Palu skip rebuilding keys at decode? Only if the key factorisation commuted with RoPE.

A latent that rotates with the keys (each latent pair at one of RoPE's frequencies) would let the
cache hold post-RoPE latents and decode attend them directly, like dense attention over fewer
dimensions, with ``B_k`` folded into the query. That constrains the factorisation: per rotary
frequency, the pairs ``(k_j, k_{j + D/2})`` of the group's heads form a complex vector, and only a
complex low-rank map per frequency commutes with the rotation. This script measures what the
constraint costs: the whitened output error of ``k_proj`` (``X^T X`` and its whitening as Palu's
calibration makes them, from the model's own activations on the bundled held-out text), Palu's real group SVD (one group of all KV heads) against
the best RoPE-commuting factorisation (a complex SVD per frequency, ranks chosen across frequencies
by singular value), at the same number of real latents per token.

``python benchmarks/palu_rope_commuting.py [--model PATH] [--tokens N] [--out FILE]`` (CPU;
default the project's needle-llama; SmolLM2: ``--model`` on the folder of ``kvpress.testbed``)."""
import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvpress.calibration.palu import collect_statistics, whitening
from kvpress.eval.tasks import load_corpus


def lost_energy(weight, xtx, kv_heads, head_dim, ratio) -> tuple[float, float]:
    """Relative squared output error ``|X W^T - X W_hat^T|^2 / |X W^T|^2`` (``xtx = X^T X``) of the best
    rank approximations keeping ``ratio`` of the real dimensions: (real group SVD, RoPE-commuting)."""
    ws = weight.double() @ whitening(xtx)  # output error = |(W - W_hat) S|, S S^T = X^T X
    total = (ws ** 2).sum()
    keep = int(ratio * kv_heads * head_dim)  # real latents per token
    real = torch.linalg.svdvals(ws) ** 2
    heads = ws.reshape(kv_heads, head_dim, -1)
    half = head_dim // 2  # transformers' rotate_half pairs dimension j with j + D/2
    per_frequency = [torch.linalg.svdvals(torch.complex(heads[:, j], heads[:, j + half])) ** 2 for j in range(half)]
    complex_ = torch.sort(torch.cat(per_frequency), descending=True).values  # two real latents each
    return (real[keep:].sum() / total).item(), (complex_[keep // 2:].sum() / total).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path(__file__).parents[1] / "models" / "needle-llama"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.5, 0.75])
    parser.add_argument("--out", help="a JSON file for the results")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(load_corpus("heldout")[: 200 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
    config = model.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    xtx = collect_statistics(model, [ids], fisher=False, progress=False)["xtx"]  # each k_proj's input
    rows = []
    for ratio in args.ratios:
        for i, layer in enumerate(model.model.layers):
            real, commuting = lost_energy(layer.self_attn.k_proj.weight, xtx[i], kv_heads, head_dim, ratio)
            rows.append({"ratio": ratio, "layer": i, "real_group_svd": real, "rope_commuting": commuting})
        mean = {key: sum(r[key] for r in rows if r["ratio"] == ratio) / len(model.model.layers)
                for key in ("real_group_svd", "rope_commuting")}
        print(f"kept {ratio:.0%}: lost output energy of k_proj, mean over layers: real group SVD "
              f"{mean['real_group_svd']:.4f}, RoPE-commuting {mean['rope_commuting']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": Path(args.model).name, "tokens": ids.shape[1],
                                              "kv_heads": kv_heads, "head_dim": head_dim, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
