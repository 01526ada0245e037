"""The shared conformance suite: every kvpress method (``tests/cases_<method>.py``) on tiny random
models of every family. See ``tests/conformance.py`` for what a case provides."""

import copy
import importlib
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import kvpress
from tiny_models import cache_kw, random_ids, tiny_model

CASES = {path.stem.removeprefix("cases_"): importlib.import_module(path.stem).CASE
         for path in sorted(Path(__file__).parent.glob("cases_*.py"))}
ALL = [(name, family) for name, case in CASES.items() for family in case.families]
FLAT = [name for name, case in CASES.items() if case.flat is not None]


def make_model(family: str, **overrides):
    if family == "mistral-sliding":
        return tiny_model("mistral", sliding_window=16, **overrides)
    return tiny_model(family, **overrides)


def patch(model, setting: dict, **extra):
    setting = {**setting, **extra}
    return kvpress.patch(model, setting.pop("method"), **setting)



def greedy(model, ids, new_tokens=10, **kwargs):
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


def identity(model) -> dict:
    return {name: id(x) for name, x in [*model.named_modules(), *model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("name, family", ALL)
@torch.no_grad()
def test_lossless_setting_equals_unpatched(name, family):
    model = make_model(family)
    ids = random_ids(2, 41)
    logits = model(ids).logits
    tokens, gen_logits = greedy(model, ids)
    patch(model, CASES[name].lossless(model))
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    patched_tokens, patched_logits = greedy(model, ids)
    assert torch.equal(patched_tokens, tokens)
    torch.testing.assert_close(patched_logits, gen_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, family", ALL)
@torch.no_grad()
def test_unpatch_restores_logits_and_module_identity(name, family):
    model = make_model(family)
    ids = random_ids(2, 25)
    before, objects = model(ids).logits, identity(model)
    implementation = model.config._attn_implementation
    patch(model, CASES[name].setting(model))
    model(ids)
    kvpress.unpatch(model)
    assert torch.equal(model(ids).logits, before)
    assert identity(model) == objects
    assert model.config._attn_implementation == implementation
    assert "_kvpress_patch" not in vars(model) and not vars(model.model).get("_forward_pre_hooks")
    assert not any("_kvpress_method" in vars(m) or "forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("name, family", ALL)
@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(name, family):
    model = make_model(family)
    patch(model, CASES[name].setting(model))
    prompts = [random_ids(1, n, seed=n)[0] for n in (30, 19, 24)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batch_tokens, batch_logits = greedy(model, ids, attention_mask=mask, new_tokens=12)
    for row, p in enumerate(prompts):
        tokens, logits = greedy(model, p[None], new_tokens=12)
        assert torch.equal(batch_tokens[row], tokens[0])
        torch.testing.assert_close(batch_logits[row], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, family", [(n, f) for n, f in ALL if CASES[n].chunk_invariant])
@torch.no_grad()
def test_chunked_prefill_equals_unchunked(name, family):
    model = make_model(family)
    patch(model, CASES[name].setting(model))
    ids = random_ids(2, 47)
    whole = model(ids).logits[:, -1]
    cache = kvpress.make_cache(model)
    for start in range(0, 47, 10):
        out = model(ids[:, start:start + 10], **{cache_kw(model): cache})
    torch.testing.assert_close(out.logits[:, -1], whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.expected_bytes is not None])
@torch.no_grad()
def test_cache_bytes_are_exact(name):
    model = make_model("llama")
    patch(model, CASES[name].setting(model))
    cache = model(random_ids(1, 200)).past_key_values
    assert kvpress.kv_cache_bytes(cache) == CASES[name].expected_bytes(model, 200)


@pytest.mark.parametrize("name", FLAT)
@torch.no_grad()
def test_memory_is_flat_over_2000_decode_steps(name):
    model = make_model("llama")
    patch(model, CASES[name].flat(model))
    cache = kvpress.make_cache(model)
    token = random_ids(1, 40)
    sizes = []
    for step in range(2000):
        out = model(token, **{cache_kw(model): cache})
        token = out.logits[:, -1:].argmax(-1)
        if step in (100, 1999):
            sizes.append(kvpress.kv_cache_bytes(cache))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_sampling_beams_and_batch_repeat_follow_generate(name):
    """Sampling with num_return_sequences, beam search and batch_repeat_interleave on a filled cache run
    and, in the lossless setting, give what the unpatched model gives."""
    model = make_model("llama")
    ids = random_ids(2, 20)
    runs = {}
    for patched in (False, True):
        if patched:
            patch(model, CASES[name].lossless(model))
        torch.manual_seed(0)
        sampled = model.generate(ids, do_sample=True, num_return_sequences=2, max_new_tokens=6)
        beams = model.generate(ids, num_beams=3, do_sample=False, max_new_tokens=6)
        cache = model(ids).past_key_values
        cache.batch_repeat_interleave(2)
        step = model(random_ids(4, 1, seed=5), **{cache_kw(model): cache}).logits
        runs[patched] = (sampled, beams, step)
    for unpatched, patched in zip(runs[False], runs[True]):
        torch.testing.assert_close(patched.float(), unpatched.float(), rtol=1e-4, atol=1e-4)
    kvpress.unpatch(model)
    patch(model, CASES[name].setting(model))  # and in the lossy setting, they run
    model.generate(ids, do_sample=True, num_return_sequences=2, max_new_tokens=4)
    model.generate(ids, num_beams=3, max_new_tokens=4)


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_a_failed_forward_leaves_the_cache_usable(name, monkeypatch):
    model = make_model("llama")
    patch(model, CASES[name].setting(model))
    ids, steps = random_ids(2, 30), random_ids(2, 5, seed=1)

    def run(fail_at=None):
        cache = model(ids).past_key_values
        for t in range(steps.shape[1]):
            if t == fail_at:
                with monkeypatch.context() as m:
                    m.setattr(model.model.layers[1].self_attn, "_kvpress_method", None)  # its attention raises
                    with pytest.raises(RuntimeError):
                        model(random_ids(2, 1, seed=9), **{cache_kw(model): cache})
            logits = model(steps[:, t:t + 1], **{cache_kw(model): cache}).logits
        return logits, cache

    clean_logits, clean_cache = run()
    logits, cache = run(fail_at=2)
    torch.testing.assert_close(logits, clean_logits)
    assert kvpress.kv_cache_bytes(cache) == kvpress.kv_cache_bytes(clean_cache)


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_foreign_or_non_empty_cache_is_refused(name):
    model = make_model("llama")
    ids = random_ids(1, 10)
    dense_cache = model(ids).past_key_values
    patch(model, CASES[name].setting(model))
    with pytest.raises(ValueError, match="DynamicCache that is not empty"):
        model(ids[:, :1], **{cache_kw(model): dense_cache})
    old = model(ids).past_key_values
    kvpress.unpatch(model)
    patch(model, CASES[name].setting(model))
    with pytest.raises(ValueError, match="kvpress cache of another patch"):
        model(ids[:, :1], **{cache_kw(model): old})
    assert model(ids, **{cache_kw(model): DynamicCache()}).logits.shape[1] == 10  # an empty cache is filled


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_clearly_and_leaves_the_model_untouched(name):
    for kwargs, error, message in CASES[name].bad_input:
        model = make_model("llama")
        objects, implementation = identity(model), model.config._attn_implementation
        with pytest.raises(error, match=message):
            patch(model, kwargs)
        assert identity(model) == objects and model.config._attn_implementation == implementation
        assert "_kvpress_patch" not in vars(model) and not model.model._forward_pre_hooks


@pytest.mark.parametrize("name", CASES)
def test_a_patched_model_cannot_be_copied(name):
    model = make_model("llama")
    patch(model, CASES[name].setting(model))
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(model)
    kvpress.unpatch(model)
    copy.deepcopy(model)  # fine once unpatched
