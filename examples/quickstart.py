"""Quickstart: patch a model with DuoAttention, generate, and compare the KV cache bytes.

Runs on CPU in seconds, with no download: a tiny random Llama stands in for a real checkpoint.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpress

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, pad_token_id=0,
)
model = LlamaForCausalLM(config).eval()
prompt = torch.randint(1, 256, (1, 2048))

with torch.no_grad():
    dense = model.generate(prompt, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)

    # Half of the KV heads become streaming heads (64 sink + 256 recent tokens); here chosen at
    # random. A real model uses calibrated gates: kvpress-calibrate duo --model PATH --out duo.safetensors
    gates = torch.rand(config.num_hidden_layers, config.num_key_value_heads)
    kvpress.patch(model, "duo", config=kvpress.DuoConfig(gates=gates, sink=64, recent=256, sparsity=0.5))
    duo = model.generate(prompt, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    kvpress.unpatch(model)

dense_bytes = kvpress.kv_cache_bytes(dense.past_key_values)
duo_bytes = kvpress.kv_cache_bytes(duo.past_key_values)
print(f"dense cache: {dense_bytes / 2**20:.2f} MiB")
print(f"duo cache:   {duo_bytes / 2**20:.2f} MiB ({duo_bytes / dense_bytes:.2f}x)")
print("first new tokens, dense:", dense.sequences[0, -16:].tolist())
print("first new tokens, duo:  ", duo.sequences[0, -16:].tolist())
