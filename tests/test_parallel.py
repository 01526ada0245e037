"""kvpress inside transformers' tensor parallelism and accelerate's device_map (issue #17).

* Tensor parallel, 2 ranks: each rank's attention holds half the heads, kvpress cuts the per-head
  configs to them, and greedy tokens of a left-padded batch equal the unsharded model's. On CPU
  (gloo, two spawned processes, CI) and on two GPUs (NCCL).
* device_map across two GPUs: every cache layer lives on its model layer's device and the tokens
  equal the single-GPU run's.
* The head-cutting mechanism itself (``select_heads``, ``describe``'s heads) on one process.
"""

import dataclasses
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import kvpress
from kvpress.adapters import HeadShard, describe
from kvpress.methods.base import HeadAxis, select_heads
from tiny_models import random_ids, tiny_model

PROMPT, NEW = 20, 8  # a duo window of sink 2 + recent 4 is compacted during these steps (slack 16)
METHODS = ("dense", "duo")


def config_of(method: str, layers: int = 2):
    """The method's config for ``tiny_model`` with ``layers`` layers (Duo: fixed random gates, half the
    KV heads streaming, picked over the whole model)."""
    if method == "dense":
        return None
    gates = torch.rand(layers, 4, generator=torch.Generator().manual_seed(3))
    return kvpress.DuoConfig(gates=gates, sink=2, recent=4, sparsity=0.5)


def two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def batch(device="cpu"):
    """Two rows, the second left-padded by 5 tokens."""
    ids = random_ids(2, PROMPT)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids.to(device), mask.to(device)


def greedy(model, device="cpu") -> list:
    ids, mask = batch(device)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    return out[:, PROMPT:].tolist()


def all_tokens(model, device="cpu", layers: int = 2) -> dict:
    """Greedy tokens of ``model``: unpatched, and patched with each method."""
    tokens = {"unpatched": greedy(model, device)}
    for name in METHODS:
        kvpress.patch(model, name, config_of(name, layers))
        tokens[name] = greedy(model, device)
        kvpress.unpatch(model)
    return tokens


# -- tensor parallel: two processes ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_rank(rank: int, world: int, folder: str, port: int, backend: str, out: str) -> None:
    """One rank: load the model tensor parallel, generate unpatched and with each method."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from kvpress.parallel import total_kv_cache_bytes

    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32)
        device = "cuda" if backend == "nccl" else "cpu"
        heads = describe(model).heads
        result = {"heads": [heads.rank, heads.world_size, list(heads.kv_heads), list(heads.query_heads)],
                  "tokens": {"unpatched": greedy(model, device)}, "bytes": {}}
        for name in METHODS:
            kvpress.patch(model, name, config_of(name))
            result["tokens"][name] = greedy(model, device)
            ids, mask = batch(device)
            cache = model(ids, attention_mask=mask).past_key_values
            kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.held_tensors())
            total_kv = torch.tensor([kv], device=device)
            dist.all_reduce(total_kv)
            result["bytes"][name] = [kvpress.kv_cache_bytes(cache), total_kv_cache_bytes(cache), kv, int(total_kv)]
            kvpress.unpatch(model)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_tensor_parallel(backend: str) -> list[dict]:
    """Save the tiny model, run ``_tp_rank`` in 2 spawned processes, return each rank's result."""
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as out:
        tiny_model("llama").save_pretrained(folder)
        mp.spawn(_tp_rank, args=(2, folder, _free_port(), backend, out), nprocs=2, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


def held_kv_bytes(model, device) -> int:
    ids, mask = batch(device)
    cache = model(ids, attention_mask=mask).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.held_tensors())


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_tensor_parallel_tokens_equal_unsharded(backend):
    if backend == "nccl" and not two_gpus():
        pytest.skip("needs 2 GPUs")
    device = "cuda" if backend == "nccl" else "cpu"
    whole = tiny_model("llama").to(device)
    expected = all_tokens(whole, device)
    whole_bytes = {}
    for name in METHODS:
        kvpress.patch(whole, name, config_of(name))
        whole_bytes[name] = held_kv_bytes(whole, device)
        kvpress.unpatch(whole)
    ranks = run_tensor_parallel(backend)
    assert [r["heads"] for r in ranks] == [[0, 2, [0, 1], [0, 1, 2, 3]], [1, 2, [2, 3], [4, 5, 6, 7]]]
    for r in ranks:
        assert r["tokens"] == expected, f"rank {r['heads'][0]}: {r['tokens']} != {expected}"
        for name in METHODS:
            local, total, kv, total_kv = r["bytes"][name]
            assert total == sum(other["bytes"][name][0] for other in ranks) and local < total
            assert total_kv == whole_bytes[name]  # the ranks' K/V add up to the whole model's
            assert 0 < kv < whole_bytes[name]


# -- device_map across two GPUs --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs 2 GPUs")
def test_device_map_tokens_equal_single_gpu():
    """Layers 0-1 on GPU 0, 2-3 on GPU 1 (what from_pretrained(device_map=...) sets up, through accelerate)."""
    from accelerate import dispatch_model

    expected = all_tokens(tiny_model("llama", num_hidden_layers=4).to("cuda:0"), "cuda:0", layers=4)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    model = tiny_model("llama", num_hidden_layers=4)
    model = dispatch_model(model, device_map, skip_keys=model._skip_keys_device_placement)
    assert all_tokens(model, "cuda:0", layers=4) == expected
    for name in METHODS:
        kvpress.patch(model, name, config_of(name, layers=4))
        ids, mask = batch("cuda:0")
        cache = model(ids, attention_mask=mask).past_key_values
        for layer, module in zip(cache.layers, describe(model).attention_modules):
            device = module.q_proj.weight.device
            assert {t.device for t in layer.held_tensors()} == {device}, name
            assert {heads.device for heads, _ in layer.group_specs} == {device}, name
        assert {layer.device for layer in cache.layers} == {torch.device("cuda", 0), torch.device("cuda", 1)}
        for _ in range(NEW):  # decode steps: GPU 1's ranks are the ledger's, appended in place there
            ids = torch.cat([ids, ids[:, -1:]], 1)
            mask = torch.cat([mask, mask[:, -1:]], 1)
            cache = model(ids[:, -1:], attention_mask=mask, past_key_values=cache).past_key_values
        ledger = cache.layers[0].ledger
        mirror = ledger._mirrors[torch.device("cuda", 1)]
        main = {None: ledger.rank, **ledger.window_rank}
        assert set(mirror) == set(main), name
        for key, buffer in mirror.items():
            assert torch.equal(buffer.tensor.cpu(), main[key].tensor.cpu()), (name, key)
        assert ledger.mirror_copies == (1 if name == "duo" else 0), name  # duo: its windows compacted once
        kvpress.unpatch(model)


# -- the mechanism, on one process -----------------------------------------------------------------


def test_duo_cut_keeps_the_whole_models_retrieval_heads():
    """Duo's sparsity ranks every head of the model: each rank's cut keeps the whole model's choice."""
    config = kvpress.DuoConfig(gates=torch.rand(3, 8, generator=torch.Generator().manual_seed(0)), sparsity=0.75)
    whole = config.retrieval_heads()
    for rank in range(4):
        shard = HeadShard(rank, 4, range(2 * rank, 2 * rank + 2), range(8 * rank, 8 * rank + 8))
        cut = select_heads(config, shard, "duo")
        assert torch.equal(cut.retrieval_heads(), whole[:, 2 * rank:2 * rank + 2])
        assert (cut.sink, cut.recent) == (config.sink, config.recent)


@dataclasses.dataclass
class _Maps:
    q: torch.Tensor  # [query heads, ...]
    k: torch.Tensor  # [KV heads, ...]


@dataclasses.dataclass
class _Config:
    scores: torch.Tensor  # [layers, query heads]
    patterns: list  # per layer {query head: pattern}
    maps: list  # per layer _Maps
    other: int = 7
    head_axes = {"scores": HeadAxis("query", dim=1), "patterns": HeadAxis("query", keyed=True),
                 "maps": {"q": HeadAxis("query"), "k": HeadAxis("kv")}}


def test_select_heads_cuts_tensors_keyed_dicts_and_structures():
    config = _Config(scores=torch.arange(16.0).view(2, 8), patterns=[{1: "a", 5: "b"}, {6: "c"}],
                     maps=[_Maps(torch.arange(8), torch.arange(4)) for _ in range(2)])
    cut = select_heads(config, HeadShard(1, 2, range(2, 4), range(4, 8)), "test")
    assert torch.equal(cut.scores, torch.tensor([[4.0, 5, 6, 7], [12, 13, 14, 15]]))
    assert cut.patterns == [{1: "b"}, {2: "c"}]  # renumbered to the rank's own heads
    assert all(torch.equal(m.q, torch.arange(4, 8)) and torch.equal(m.k, torch.arange(2, 4)) for m in cut.maps)
    assert cut.other == 7


def test_a_config_that_cannot_be_cut_is_refused():
    @dataclasses.dataclass
    class Unsliceable:
        gates: torch.Tensor

    with pytest.raises(ValueError, match="cannot run under tensor parallelism yet.*head_axes"):
        select_heads(Unsliceable(torch.ones(2, 4)), HeadShard(0, 2, range(2), range(4)), "mine")


def test_describe_reads_the_rank_heads_from_sharded_projections():
    """A model whose q/k/v projections hold only the second half of the heads (as a tensor-parallel
    rank's do) is described with that rank's heads, and dense / duo run on it."""

    class Mesh:  # what transformers leaves on a tensor-parallel model (its tp device mesh)
        ndim, mesh_dim_names = 1, ("tp",)

        def size(self, dim=0):
            return 2

        def get_local_rank(self, dim=0):
            return 1

    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # colwise: the rank's output rows
                rows = proj.weight.shape[0] // 2
                proj.weight = torch.nn.Parameter(proj.weight[rows:].clone())
            attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, 64:].clone())  # rowwise: its input columns
    model._device_mesh = Mesh()
    info = describe(model)
    assert info.heads == HeadShard(1, 2, range(2, 4), range(4, 8))
    assert (info.num_heads, info.num_kv_heads, info.shape.num_kv_heads) == (4, 2, 4)
    assert (info.local_shape.num_heads, info.local_shape.num_kv_heads, info.local_shape.head_dim) == (4, 2, 16)
    kvpress.patch(model, "duo", config_of("duo"))
    runtime = model._kvpress_patch.method
    assert torch.equal(runtime.retrieval, config_of("duo").retrieval_heads()[:, 2:])
    ids, mask = batch()
    cache = model(ids, attention_mask=mask).past_key_values
    assert sum(len(heads) for heads, _ in cache.layers[0].group_specs) == 2
    kvpress.unpatch(model)


def test_uneven_head_split_is_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight = torch.nn.Parameter(layer.self_attn.k_proj.weight[:48].clone())
    with pytest.raises(ValueError, match="equal, contiguous block"):
        describe(model)


def test_device_ledger_sends_only_new_ranks_to_another_device():
    """The ledger's mirror on another device (``meta`` here: shapes only) is appended with each
    forward's new ranks; it is copied whole only after a window was compacted."""
    from kvpress.cache import LedgerSpec, Window
    from kvpress.parallel import DeviceLedger

    window = Window(2, 4)
    ledger = DeviceLedger(LedgerSpec(all_ranks=True, windows=(window,)))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    compactions = 0
    for step in range(41):
        ledger.begin(mask, 2, 20 if step == 0 else 1, "cpu")
        there = ledger.current("meta")
        assert there is ledger.current("meta")  # once per forward and device
        assert there.all_rank.shape == ledger.step.all_rank.shape
        assert there.window_rank[window].shape == ledger.step.window_rank[window].shape
        ledger.end()
        compactions += bool(ledger._compaction)
        if ledger._compaction:
            assert ledger.compaction(window, "meta").device.type == "meta"
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    assert compactions == ledger.mirror_copies == 3
    mirror = ledger._mirrors[torch.device("meta")]
    assert (mirror[None].length, mirror[window].length) == (ledger.rank.length, ledger.window_rank[window].length)
    ledger.select_batch(torch.tensor([1, 0]))
    assert not ledger._mirrors  # reindexed rows: copied again at the next forward


def test_total_kv_cache_bytes_without_distributed_is_kv_cache_bytes():
    from kvpress.parallel import total_kv_cache_bytes

    model = kvpress.patch(tiny_model("llama"), "dense")
    ids, mask = batch()
    cache = model(ids, attention_mask=mask).past_key_values
    assert total_kv_cache_bytes(cache) == kvpress.kv_cache_bytes(cache) > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
