"""Find needle-llama's retrieval heads by ablation, and save them as a DuoConfig.

For every KV head (layer, head), make that one head a DuoAttention streaming head (sink + recent
tokens only; every other head keeps the full cache) and measure, on fixed samples of the four tasks
(needles outside the sink and the recent window), the exact-match accuracy of the answers and their
mean negative log-likelihood. A head's score is its accuracy drop against the unpatched model, ties
broken by the change of the answer NLL (the tasks where the model is least sure, multivalue and
kvlookup, give most of that signal). The gates saved are the scores scaled to [0, 1], with
`sparsity=0.5`: the half of the heads whose ablation hurts most are the retrieval heads.

Exact match is measured under teacher forcing (argmax at every answer token = the answer), which
equals greedy decoding's exact match, with one forward pass per sample.

    python models/duo_ablation.py --model models/needle-llama \
        --out models/needle-llama/duo_ablation.safetensors --json benchmarks/results/needle_llama_ablation.json
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import kvpress
from kvpress.eval.cli import environment, load_model
from kvpress.eval.tasks import load_corpus, make_sample


@torch.no_grad()
def answer_stats(model, batches) -> tuple[float, float]:
    """(exact-match accuracy, mean answer NLL in nats per token) over (ids [B, L], answer mask) batches."""
    right, total, nll, tokens = 0, 0, 0.0, 0
    for ids, mask in batches:
        logits = model(ids.to(model.device)).logits[:, :-1].float()
        target, m = ids[:, 1:].to(model.device), mask[:, 1:].to(model.device)
        wrong = ((logits.argmax(-1) != target) & m).any(-1)
        right += (~wrong).sum().item()
        total += ids.shape[0]
        loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        nll += loss[m].sum().item()
        tokens += m.sum().item()
    return right / total, nll / tokens


def make_batches(tokenizer, tasks, lengths, depths, samples, seed, batch_size):
    """Fixed evaluation samples from the held-out corpus, batched per length (lengths are exact
    for needle-llama's byte-level tokenizer)."""
    haystack = load_corpus("heldout")
    batches = []
    for n in lengths:
        rows = []
        for task in tasks:
            for d in depths:
                for i in range(samples):
                    s = make_sample(task, tokenizer, haystack, n, d, seed=f"ablation/{seed}/{i}")
                    x = tokenizer(s.prompt).input_ids
                    a = tokenizer.encode(s.answer, add_special_tokens=False)
                    rows.append((x + a, [0] * len(x) + [1] * len(a)))
        for k in range(0, len(rows), batch_size):
            chunk = rows[k : k + batch_size]
            batches.append((torch.tensor([r[0] for r in chunk]), torch.tensor([r[1] for r in chunk], dtype=torch.bool)))
    return batches


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/needle-llama")
    p.add_argument("--tasks", default="passkey,multikey,multivalue,kvlookup")
    p.add_argument("--lengths", default="2048")
    p.add_argument("--depths", type=int, default=5, help="evenly spaced depths in [0.1, 0.8]: needles outside sink and window")
    p.add_argument("--samples", type=int, default=1, help="per (task, length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="models/needle-llama/duo_ablation.safetensors")
    p.add_argument("--json", default="benchmarks/results/needle_llama_ablation.json")
    a = p.parse_args()

    t0 = time.time()
    model, tokenizer = load_model(a.model, a.device, "float32")
    shape = kvpress.adapters.describe(model).shape
    depths = [round(0.1 + 0.7 * i / max(a.depths - 1, 1), 4) for i in range(a.depths)]
    lengths = [int(n) for n in a.lengths.split(",")]
    batches = make_batches(tokenizer, a.tasks.split(","), lengths, depths, a.samples, a.seed, a.batch_size)
    base_acc, base_nll = answer_stats(model, batches)
    print(f"unpatched: accuracy {base_acc:.3f}, answer NLL {base_nll:.4f} ({sum(len(b[0]) for b in batches)} samples)")

    acc = torch.zeros(shape.num_layers, shape.num_kv_heads)
    nll = torch.zeros_like(acc)
    heads = [(layer, h) for layer in range(shape.num_layers) for h in range(shape.num_kv_heads)]
    for layer, h in tqdm(heads, desc="ablating KV heads"):
        retrieval = torch.ones_like(acc, dtype=torch.bool)
        retrieval[layer, h] = False
        config = kvpress.DuoConfig.from_retrieval_mask(retrieval, sink=a.sink, recent=a.recent)
        kvpress.patch(model, "duo", config=config)
        acc[layer, h], nll[layer, h] = answer_stats(model, batches)
        kvpress.unpatch(model)

    # accuracy drop, ties broken by the NLL change (scaled to stay below one sample's accuracy step)
    change = (nll - base_nll) / (nll - base_nll).abs().max().clamp(min=1e-12)
    score = (base_acc - acc) + 1e-3 * change
    gates = (score - score.min()) / (score.max() - score.min()).clamp(min=1e-12)
    config = kvpress.DuoConfig(gates=gates, sink=a.sink, recent=a.recent, sparsity=0.5, model_shape=shape)
    config.save(a.out)
    retrieval = config.retrieval_heads()
    print("accuracy with each KV head streaming (rows: layers):")
    for layer in range(shape.num_layers):
        print("  " + "  ".join(f"{v:.2f}{'*' if r else ' '}" for v, r in zip(acc[layer].tolist(), retrieval[layer].tolist())))
    print(f"* = retrieval head in the 50% split; saved {a.out} in {(time.time() - t0) / 60:.1f} min")
    if a.json:
        report = {
            "command_args": vars(a),
            "environment": environment(model),
            "depths": depths,
            "samples_total": sum(len(b[0]) for b in batches),
            "unpatched": {"accuracy": base_acc, "answer_nll": base_nll},
            "ablated_accuracy": acc.tolist(),
            "ablated_answer_nll": nll.tolist(),
            "gates": gates.tolist(),
            "retrieval_heads_50pct": retrieval.int().tolist(),
            "minutes": round((time.time() - t0) / 60, 2),
        }
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
