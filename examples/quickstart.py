"""Quickstart: patch the project's test model with DuoAttention, answer a passkey question from a
4096-token prompt, and compare the KV cache bytes with the unpatched model's. CPU, no download.

The model folder ships its calibrated gates (models/needle-llama/kvpress-duo.safetensors, made by
`kvpress-calibrate duo`), which `kvpress.patch(model, "duo")` picks up by itself.
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvpress
from kvpress.eval.tasks import load_corpus, make_sample

MODEL = Path(__file__).resolve().parents[1] / "models" / "needle-llama"
tokenizer = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL).eval()

sample = make_sample("passkey", tokenizer, load_corpus("heldout"), length=4096, depth=0.3, seed=0)
inputs = tokenizer(sample.prompt, return_tensors="pt")
print(f"prompt: {inputs.input_ids.shape[1]} tokens, ending with ...{sample.prompt[-60:]!r}")


def ask():
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=len(sample.answer), do_sample=False, return_dict_in_generate=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers >= 5.24 names it `cache`
    answer = tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    return answer, kvpress.kv_cache_bytes(cache)


dense_answer, dense_bytes = ask()
kvpress.patch(model, "duo")  # 50% of the KV heads become streaming heads (64 sink + 256 recent tokens)
duo_answer, duo_bytes = ask()
kvpress.unpatch(model)

print(f"expected answer: {sample.answer}")
print(f"unpatched: {dense_answer!r:>12}  KV cache {dense_bytes / 2**20:6.2f} MiB")
print(f"duo:       {duo_answer!r:>12}  KV cache {duo_bytes / 2**20:6.2f} MiB ({duo_bytes / dense_bytes:.2f}x)")
