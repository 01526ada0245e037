"""Train needle-llama: a small byte-level Llama (GQA) that retrieves needles from 8K-token contexts.

The project's test model for KV-cache methods: small enough to ship in the repo (19 MB) and to
evaluate on a CPU, long-context enough that dropping the wrong KV heads or tokens measurably
breaks it. Reads top to bottom:

1. byte-level tokenizer (256 bytes + <pad> <bos> <eos>, token id = byte value), written as
   tokenizer.json, loadable offline with AutoTokenizer;
2. data: windows of the bundled corpora (kvpress/data: Python docstrings or code) with needles of
   the four retrieval tasks of kvpress/eval/tasks.py and up to `questions` questions at the end;
   every batch is a pure function of (seed, step, its longest length);
3. curriculum: lengths start at 256 tokens and double once the answers at the longest length are
   right 90% of the time (retrieval is learnt at short lengths first, then carried to 8192);
4. model: transformers' LlamaForCausalLM, trained with bf16 autocast and SDPA (flash) attention;
5. loss: next-byte cross-entropy on the text + the same on the answer bytes (two means, summed,
   so that the few answer bytes weigh as much as the whole text);
6. save: a Hugging Face model folder (config, safetensors, tokenizer) and train_log.json.

    python models/train_needle_llama.py --max-minutes 7 --out models/needle-llama    # H100: 6.4 min
    python models/train_needle_llama.py --device cpu --workers 0 --steps 4 --tokens-per-step 4096 \
        --max-len 1024 --out /tmp/tiny                                               # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvpress.eval.tasks import load_corpus, make_sample  # noqa: E402


@dataclass
class TrainConfig:
    # model (Llama, GQA: 8 query heads share 4 KV heads, head dim 32)
    hidden: int = 256
    intermediate: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    rope_theta: float = 100000.0
    # data: sequence lengths in tokens; all sequences of a step share one length. The longest
    # length starts at start_len and doubles (up to max_len) once the passkey and multikey
    # answers at that length are right grow_at of the time, and at the latest on a fixed
    # schedule: at force_from, force_from + force_every, ... of the steps.
    min_len: int = 256
    start_len: int = 256
    max_len: int = 8192
    grow_at: float = 0.9
    force_from: float = 0.3
    force_every: float = 0.07
    lookahead: int = 48  # lengths are decided this many steps ahead (the data workers run ahead)
    p_max_len: float = 0.5  # probability that a step uses the current longest length
    tokens_per_step: int = 65536
    code_frac: float = 0.5  # fraction of haystacks cut from Python code (the rest: docstrings)
    tasks: str = "passkey:0.35,multikey:0.35,multivalue:0.15,kvlookup:0.15"  # task:weight of the mix
    questions: int = 8  # questions per sample (the asked one + follow-ups), each answer supervised
    # optimisation (AdamW, linear warm-up, cosine decay to min_lr_frac * lr)
    steps: int = 5000
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # run
    device: str = "cuda"
    workers: int = 12
    max_minutes: float = 0.0  # stop early (and say so in the log) past this wall time; 0 = never
    log_every: int = 50
    out: str = "models/needle-llama"


# ----------------------------------------------------------------------------- tokenizer


def byte_tokenizer(max_len: int):
    """Byte-level tokenizer: id b for byte b, then <pad>=256, <bos>=257, <eos>=258; adds <bos>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}  # GPT-2's printable alias of each byte
    specials = ["<pad>", "<bos>", "<eos>"]
    vocab.update({s: 256 + i for i, s in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 257)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", model_max_length=max_len
    )


# ----------------------------------------------------------------------------- data


def forced_longest(cfg: TrainConfig, step: int) -> int:
    """The longest length the schedule imposes at `step`, whatever the accuracy."""
    t = step / cfg.steps
    doublings = 0 if t < cfg.force_from else 1 + int((t - cfg.force_from) / cfg.force_every)
    return min(cfg.max_len, cfg.start_len * 2**doublings)


def seq_len(cfg: TrainConfig, step: int, longest: int) -> int:
    """Length of the sequences of `step`: `longest`, or a multiple of 256 in [min_len, longest]."""
    rng = random.Random(f"len/{cfg.seed}/{step}")
    if rng.random() < cfg.p_max_len:
        return longest
    return rng.randrange(cfg.min_len, longest + 1, 256)


def make_batch(cfg: TrainConfig, tokenizer, corpora: list[str], step: int, longest: int):
    """(ids [B, L], answer mask [B, L], task index [B]) of `step`. The mask is 1 on the first
    answer (the one evaluation asks), 2 on follow-up answers, 0 elsewhere."""
    L = seq_len(cfg, step, longest)
    rng = random.Random(f"batch/{cfg.seed}/{step}")
    tasks, weights = zip(*task_mix(cfg).items())
    ids, mask, kind = [], [], []
    for i in range(max(1, cfg.tokens_per_step // L)):
        task = rng.choices(tasks, weights)[0]
        most = {"passkey": 1, "multikey": min(8, L // 128), "multivalue": min(6, L // 128), "kvlookup": min(64, L // 48)}
        needles = rng.randint(min(2, most[task]), most[task])  # keys / values / pairs, fewer in short sequences
        corpus = corpora[rng.random() < cfg.code_frac]
        seed = f"train/{cfg.seed}/{step}/{i}"
        s = make_sample(task, tokenizer, corpus, L, rng.random(), seed, num_needles=needles, questions=min(cfg.questions, max(1, L // 384)))
        x = tokenizer.encode(s.prompt)
        m = [0] * len(x)
        for j, (q, a) in enumerate([("", s.answer)] + s.followups):
            q, a = tokenizer.encode(q, add_special_tokens=False), tokenizer.encode(a, add_special_tokens=False)
            x += q + a
            m += [0] * len(q) + [1 if j == 0 else 2] * len(a)
        assert len(x) == L, (len(x), L)  # byte-level tokenizer + ASCII corpus: lengths are exact
        ids.append(x)
        mask.append(m)
        kind.append(tasks.index(task))
    return torch.tensor(ids), torch.tensor(mask, dtype=torch.uint8), torch.tensor(kind)


def task_mix(cfg: TrainConfig) -> dict[str, float]:
    return {name: float(w) for name, w in (item.split(":") for item in cfg.tasks.split(","))}


class Batches(torch.utils.data.IterableDataset):
    """Steps 0..steps-1 in order; worker w makes steps w, w + workers, ... (round robin).

    longest: shared table of the longest length of each step, written by the training loop
    `lookahead` steps ahead; a worker waits for its step's entry."""

    def __init__(self, cfg: TrainConfig, longest: torch.Tensor):
        self.cfg, self.longest = cfg, longest

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        tokenizer = byte_tokenizer(self.cfg.max_len)
        corpora = [load_corpus("train"), load_corpus("code")]
        for step in range(w, self.cfg.steps, n):
            while self.longest[step] == 0:
                time.sleep(0.002)
            yield step, *make_batch(self.cfg, tokenizer, corpora, step, int(self.longest[step]))


# ----------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=259,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- train


def train(cfg: TrainConfig):
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    tokenizer = byte_tokenizer(cfg.max_len)
    model = build_model(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"needle-llama: {n_params / 1e6:.2f}M parameters, {cfg.steps} steps of {cfg.tokens_per_step} tokens")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    longest = torch.zeros(cfg.steps, dtype=torch.int32).share_memory_()
    longest[: cfg.lookahead] = cfg.start_len
    current, recent = cfg.start_len, []  # current longest length; answers right at it (passkey, multikey)
    loader = torch.utils.data.DataLoader(
        Batches(cfg, longest), batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0, log, stats = time.time(), [], {}
    model.train()
    tasks = list(task_mix(cfg))
    for step, ids, ans, kind in loader:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        ids, ans = ids.to(device, non_blocking=True), ans.to(device, non_blocking=True)
        with autocast:
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view_as(ans[:, 1:])
        is_ans, first = ans[:, 1:] > 0, ans[:, 1:] == 1
        loss_text = nll[~is_ans].mean()
        loss_ans = nll[is_ans].mean()
        loss = loss_text + loss_ans
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        # exact match of the answers under teacher forcing = exact match of greedy decoding
        with torch.no_grad():
            exact = (~((logits.argmax(-1) != ids[:, 1:]) & first).any(-1)).float().cpu()  # first answer
        for k, v in (("text", loss_text.item()), ("answer", loss_ans.item())):
            stats.setdefault(k, []).append(v)
        for i, task in enumerate(tasks):
            stats.setdefault("exact_" + task, []).extend(exact[kind == i].tolist())
        if ids.shape[1] == current:
            judged = torch.tensor([tasks[k] in ("passkey", "multikey") for k in kind.tolist()], dtype=torch.bool)
            recent = (recent + exact[judged].tolist())[-128:]

        # curriculum: decide the longest length of step + lookahead
        grown = current
        if len(recent) >= 64 and sum(recent) / len(recent) >= cfg.grow_at:
            grown = min(cfg.max_len, 2 * current)
        grown = max(grown, forced_longest(cfg, step + cfg.lookahead))
        if grown != current:
            print(f"step {step}: longest length {current} -> {grown}", flush=True)
            log.append({"step": step, "longest": grown, "recent_exact": round(sum(recent) / max(1, len(recent)), 3)})
            current, recent = grown, []
        if step + cfg.lookahead < cfg.steps:
            longest[step + cfg.lookahead] = current
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            row = {k: round(sum(v) / len(v), 4) for k, v in stats.items() if v}
            row.update(step=step, len=ids.shape[1], longest=current, lr=round(lr_at(cfg, step), 6), minutes=round((time.time() - t0) / 60, 2))
            log.append(row)
            stats = {}
            print(json.dumps(row), flush=True)
        if cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes:
            print(f"stopping early at step {step}: past {cfg.max_minutes} minutes")
            log.append({"stopped_early_at_step": step})
            break

    os.makedirs(cfg.out, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(cfg.out)
    tokenizer.save_pretrained(cfg.out)
    minutes = (time.time() - t0) / 60
    with open(os.path.join(cfg.out, "train_log.json"), "w") as f:
        json.dump(
            {
                "config": asdict(cfg),
                "parameters": n_params,
                "minutes": round(minutes, 2),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "log": log,
            },
            f,
            indent=1,
        )
    print(f"saved {cfg.out} after {minutes:.1f} min")
    return model, tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(TrainConfig):
        if f.type in ("int", "float", "str"):
            p.add_argument("--" + f.name.replace("_", "-"), type=eval(f.type), default=f.default)
    args = p.parse_args()
    train(TrainConfig(**vars(args)))


if __name__ == "__main__":
    main()
