"""Where Palu's graph decode and its eager decode part on the GPU (the GPU test
``tests/test_palu.py::test_gpu_graph_decode_equals_eager``): for the decode kernel and the torch
reference, with and without the fused small ops, bf16 and 4-bit latents, the first step whose greedy
token differs, the largest logit difference before it, and eager's top-2 logit gap there (a near-tie
or not). Writes ``palu_graph_probe_<GPU>.json``.

    python benchmarks/palu_graph_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
import common as c  # noqa: E402
from test_graph import generate, gpu_model, padded  # noqa: E402

import kvpress.kernels as kernels  # noqa: E402


def compare(tokens, logits, g_tokens, g_logits, prompt_width):
    new, g_new = tokens[:, prompt_width:], g_tokens[:, prompt_width:]
    differ = (new != g_new).any(0).nonzero()
    first = int(differ[0]) if len(differ) else new.shape[1]
    before = (g_logits[:, :first].float() - logits[:, :first].float()).abs().max().item() if first else 0.0
    row = {"steps": new.shape[1], "first_differing_step": first if first < new.shape[1] else None,
           "max_logit_diff_before": before,
           "max_logit_diff_step0": (g_logits[:, 0].float() - logits[:, 0].float()).abs().max().item()}
    if first < new.shape[1]:
        top2 = logits[:, first].float().topk(2, -1).values
        row["eager_top2_gap_there"] = (top2[:, 0] - top2[:, 1]).tolist()
        row["logit_diff_there"] = (g_logits[:, first].float() - logits[:, first].float()).abs().amax(-1).tolist()
    return row


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    model = gpu_model()
    ids, mask = padded((300, 170, 420))
    ids, mask = ids.cuda(), mask.cuda()
    rows = []
    for backend in ("auto", "reference"):
        for fuse in ("default", "none"):
            for bits in (None, 4):
                kernels.BACKEND = backend
                setting = dict(method="palu", rank_ratio=0.5, group_size=1, bits=bits)
                tokens, logits, _ = generate(model, setting, "eager", ids, fuse=fuse, attention_mask=mask,
                                             max_new_tokens=40, do_sample=False)
                g_tokens, g_logits, stats = generate(model, setting, "graph", ids, fuse=fuse, attention_mask=mask,
                                                     max_new_tokens=40, do_sample=False)
                row = {"backend": backend, "fuse": fuse, "bits": bits, "graph_stats": stats,
                       **compare(tokens, logits, g_tokens, g_logits, ids.shape[1])}
                print(row, flush=True)
                rows.append(row)
    kernels.BACKEND = "auto"
    env = c.environment()
    c.write_json(Path(args.out) / f"palu_graph_probe_{c.device_tag(env)}.json", {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
