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
from tiny_models import cache_kw, random_ids, tiny_model

PROMPT, NEW = 20, 8  # a duo window of sink 2 + recent 4 is compacted during these steps (slack 16)
CASES = ("dense", "duo", "minference", "minference+duo", "less", "palu")
EXACT_BYTES = ("dense", "duo")  # whose ranks' K/V buffers add up to the whole model's byte for byte


def duo_config(layers: int) -> kvpress.DuoConfig:
    """Fixed random gates, half the KV heads streaming (picked over the whole model: Duo's sparsity)."""
    gates = torch.rand(layers, 4, generator=torch.Generator().manual_seed(3))
    return kvpress.DuoConfig(gates=gates, sink=2, recent=4, sparsity=0.5)


def minference_config(layers: int):
    """Sparse at any length: even query heads A-shape (2 sinks, 8 recent), odd heads VS (30, 50)."""
    from kvpress.methods.minference import MInferenceConfig

    layer = {h: ("stream_llm", 2, 8) if h % 2 == 0 else ("vertical_and_slash", 30, 50) for h in range(8)}
    return MInferenceConfig(patterns=[dict(layer) for _ in range(layers)], min_length=0, min_queries=0, max_density=1e9)


def case_config(case: str, model) -> tuple:
    """``(method, config)`` of a test case for ``model`` (the whole model, on one device)."""
    layers = model.config.num_hidden_layers
    if case == "dense":
        return "dense", None
    if case == "duo":
        return "duo", duo_config(layers)
    if case == "minference":
        return "minference", minference_config(layers)
    if case == "minference+duo":
        return ["minference", "duo"], {"minference": minference_config(layers), "duo": duo_config(layers)}
    if case == "less":
        from kvpress.methods.less import LessConfig

        config = LessConfig.random(describe(model).shape, rank=4, hidden=16, policy="h2o", sink=2, heavy=3, recent=4)
        for w in config.layers:  # the state's scales raised, so that the state changes the output
            w.k_scale.fill_(0.5)
            w.k_mix_scale.fill_(0.1)
        return "less", config
    if case == "palu":  # exact factors of the model's own weights, in groups of 2 KV heads (one per rank)
        kvpress.patch(model, "palu", group_size=2)
        config = model._kvpress_patch.method.config
        kvpress.unpatch(model)
        return "palu", config
    raise ValueError(case)


def tensor_parallel_ready(case: str) -> bool:
    """Whether every config of the case can be cut to a rank's heads (``select_heads``)."""
    from kvpress.methods import get_method

    classes = [get_method(name).config_class for name in case.split("+")]
    return all(hasattr(c, "head_axes") or hasattr(c, "select_heads") for c in classes)


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


def all_tokens(model, cases: dict, device="cpu") -> dict:
    """Greedy tokens of ``model``: unpatched, and patched as each case."""
    tokens = {"unpatched": greedy(model, device)}
    for case, (method, config) in cases.items():
        kvpress.patch(model, method, config)
        tokens[case] = greedy(model, device)
        kvpress.unpatch(model)
    return tokens


def held_kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.held_tensors())


# -- tensor parallel: two processes ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_rank(rank: int, world: int, folder: str, port: int, backend: str, cases: dict, out: str) -> None:
    """One rank: load the model tensor parallel, generate unpatched and as each case."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from kvpress.parallel import tensor_parallel_args, total_kv_cache_bytes

    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **tensor_parallel_args())
        device = "cuda" if backend == "nccl" else "cpu"
        heads = describe(model).heads
        result = {"heads": [heads.rank, heads.world_size, list(heads.kv_heads), list(heads.query_heads)],
                  "tokens": all_tokens(model, cases, device), "bytes": {}}
        for case in EXACT_BYTES:
            kvpress.patch(model, *cases[case])
            ids, mask = batch(device)
            cache = model(ids, attention_mask=mask).past_key_values
            kv = torch.tensor([held_kv_bytes(cache)], device=device)
            dist.all_reduce(kv)
            result["bytes"][case] = [kvpress.kv_cache_bytes(cache), total_kv_cache_bytes(cache), held_kv_bytes(cache), int(kv)]
            kvpress.unpatch(model)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # leave together
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort the interpreter's exit ("terminate called without an active exception",
    # seen with transformers 5.13); the result is written, so leave without the exit-time teardown.
    os._exit(0)


def run_tensor_parallel(backend: str, cases: dict) -> list[dict]:
    """Save the tiny model, run ``_tp_rank`` in 2 spawned processes, return each rank's result."""
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as out:
        tiny_model("llama").save_pretrained(folder)
        mp.spawn(_tp_rank, args=(2, folder, _free_port(), backend, cases, out), nprocs=2, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_tensor_parallel_tokens_equal_unsharded(backend):
    """Every method whose config can be cut to a rank's heads (dense, duo; the others once they declare
    ``head_axes``), on a left-padded batch."""
    if backend == "nccl" and not two_gpus():
        pytest.skip("needs 2 GPUs")
    device = "cuda" if backend == "nccl" else "cpu"
    whole = tiny_model("llama").to(device)
    cases = {case: case_config(case, whole) for case in CASES if tensor_parallel_ready(case)}
    assert set(EXACT_BYTES) <= set(cases)
    expected = all_tokens(whole, cases, device)
    whole_bytes = {}
    for case in EXACT_BYTES:
        kvpress.patch(whole, *cases[case])
        ids, mask = batch(device)
        whole_bytes[case] = held_kv_bytes(whole(ids, attention_mask=mask).past_key_values)
        kvpress.unpatch(whole)
    cases = {case: (method, _to_cpu(config)) for case, (method, config) in cases.items()}
    ranks = run_tensor_parallel(backend, cases)
    assert [r["heads"] for r in ranks] == [[0, 2, [0, 1], [0, 1, 2, 3]], [1, 2, [2, 3], [4, 5, 6, 7]]]
    for r in ranks:
        differ = {case: (got, expected[case]) for case, got in r["tokens"].items() if got != expected[case]}
        assert not differ, f"rank {r['heads'][0]}: tokens differ from the unsharded model's: {differ}"
        for case in EXACT_BYTES:
            local, total, kv, total_kv = r["bytes"][case]
            assert total == sum(other["bytes"][case][0] for other in ranks) and local < total
            assert total_kv == whole_bytes[case]  # the ranks' K/V add up to the whole model's
            assert 0 < kv < whole_bytes[case]


def _to_cpu(config):
    """A config with its tensors on the CPU (to send to other processes)."""
    if isinstance(config, dict):
        return {k: _to_cpu(v) for k, v in config.items()}
    if isinstance(config, torch.Tensor):
        return config.cpu()
    if dataclasses.is_dataclass(config):
        return dataclasses.replace(config, **{f.name: _to_cpu(getattr(config, f.name)) for f in dataclasses.fields(config)
                                              if f.init})
    if isinstance(config, list):
        return [_to_cpu(v) for v in config]
    return config


# -- device_map across two GPUs --------------------------------------------------------------------


def _dispatched(layers: int = 4):
    """Layers 0-1 on GPU 0, 2-3 on GPU 1 (what from_pretrained(device_map=...) sets up, through accelerate)."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    model = tiny_model("llama", num_hidden_layers=layers)
    return dispatch_model(model, device_map, skip_keys=model._skip_keys_device_placement)


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs 2 GPUs")
@pytest.mark.parametrize("case", [c for c in CASES if c != "palu"])
def test_device_map_tokens_equal_single_gpu(case):
    single = tiny_model("llama", num_hidden_layers=4).to("cuda:0")
    cases = {case: case_config(case, single)}
    expected = all_tokens(single, cases, "cuda:0")
    model = _dispatched()
    assert all_tokens(model, cases, "cuda:0") == expected
    if case not in ("dense", "duo"):
        return
    kvpress.patch(model, *cases[case])
    ids, mask = batch("cuda:0")
    cache = model(ids, attention_mask=mask).past_key_values
    for layer, module in zip(cache.layers, describe(model).attention_modules):
        device = module.q_proj.weight.device
        assert {t.device for t in layer.held_tensors()} == {device}
        assert {heads.device for heads, _ in layer.group_specs} == {device}
    assert {layer.device for layer in cache.layers} == {torch.device("cuda", 0), torch.device("cuda", 1)}
    for _ in range(NEW):  # decode steps: GPU 1's ranks are the ledger's, appended in place there
        ids = torch.cat([ids, ids[:, -1:]], 1)
        mask = torch.cat([mask, mask[:, -1:]], 1)
        cache = model(ids[:, -1:], attention_mask=mask, **{cache_kw(model): cache}).past_key_values
    ledger = cache.layers[0].ledger
    mirror = ledger._mirrors[torch.device("cuda", 1)]
    main = {None: ledger.rank, **ledger.window_rank}
    assert set(mirror) == set(main)
    for key, buffer in mirror.items():
        assert torch.equal(buffer.tensor.cpu(), main[key].tensor.cpu()), key
    assert ledger.mirror_copies == (1 if case == "duo" else 0)  # duo: its windows compacted once
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
    kvpress.patch(model, "duo", duo_config(2))
    runtime = model._kvpress_patch.method
    assert torch.equal(runtime.retrieval, duo_config(2).retrieval_heads()[:, 2:])
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


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs 2 GPUs")
def test_device_map_palu_tokens_equal_single_gpu():
    """Palu keeps one rotary-position buffer and one pair of rotary tables per device its layers run on
    (the tables are made by the model's rotary module, which accelerate keeps on the first GPU)."""
    single = tiny_model("llama", num_hidden_layers=4).to("cuda:0")
    cases = {"palu": case_config("palu", single)}
    assert all_tokens(_dispatched(), cases, "cuda:0") == all_tokens(single, cases, "cuda:0")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
