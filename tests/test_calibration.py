"""DuoAttention calibration: the streaming attention it trains through, its data, the command end
to end at tiny sizes, resuming, and patch-time defaults."""

import logging

import pytest
import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

import kvpress
from kvpress.calibration.cli import main
from kvpress.calibration.data import NATO, PasskeyData, PasskeyRecipe, read_haystack
from kvpress.calibration.duo import DuoTraining, streaming_attention, train_gates
from kvpress.kernels.reference import rank_attention

TINY_RECIPE = ["--min-length", "300", "--max-length", "500", "--num-lengths", "3",
               "--num-passkeys", "2", "--passkey-words", "4", "--train-sink", "8", "--train-recent", "16",
               "--data", "passkey"]  # the default mix needs longer samples than these


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("length, sink, recent, heads, kv_heads", [(37, 4, 8, 4, 2), (64, 0, 16, 2, 2), (100, 16, 7, 4, 1), (5, 10, 3, 2, 2)])
def test_streaming_attention_matches_rank_mask_reference(length, sink, recent, heads, kv_heads):
    q, k, v = (torch.randn(2, h, length, 16) for h in (heads, kv_heads, kv_heads))
    rank = torch.arange(length, dtype=torch.int32).expand(2, -1)
    expected = rank_attention(q, k, v, rank, rank, 0.25, sink=sink, recent=recent)
    torch.testing.assert_close(streaming_attention(q, k, v, sink, recent, 0.25), expected, rtol=1e-5, atol=1e-5)


def test_passkey_samples_are_exact_and_deterministic():
    tokenizer = ByT5Tokenizer()
    recipe = PasskeyRecipe(min_length=400, max_length=800, num_lengths=3, num_passkeys=2, passkey_words=5)
    data = PasskeyData(tokenizer, recipe, read_haystack(), seed=1)
    for index, length in enumerate(recipe.lengths()):
        sample = data.sample(index)
        assert sample.input_ids.shape == (1, length)
        answers = tokenizer.decode(sample.input_ids[0][sample.supervised]).split()
        assert len(answers) == 2 * 5 and set(answers) <= set(NATO)
        text = tokenizer.decode(sample.input_ids[0])
        assert all(" ".join(answers[i * 5 : (i + 1) * 5]) in text.split("What is")[0] for i in range(2))
    assert torch.equal(data.sample(2).input_ids, PasskeyData(tokenizer, recipe, read_haystack(), seed=1).sample(2).input_ids)
    assert not torch.equal(data.sample(2).input_ids, PasskeyData(tokenizer, recipe, read_haystack(), seed=2).sample(2).input_ids)
    with pytest.raises(ValueError, match="--num-passkeys"):
        PasskeyData(tokenizer, PasskeyRecipe(min_length=100, max_length=200), read_haystack())


def test_command_end_to_end(model_dir, tmp_path):
    out = tmp_path / "duo.safetensors"
    args = ["duo", "--model", str(model_dir), "--out", str(out), "--steps", "6", "--no-progress",
            "--pattern-dir", str(tmp_path / "pattern"), *TINY_RECIPE]
    assert main(args) == 0
    config = kvpress.DuoConfig.load(out)
    assert config.gates.shape == (2, 2) and config.model_shape.num_kv_heads == 2
    assert (config.gates < 1).all() and config.gates.std() > 0  # trained, and heads differ
    torch.testing.assert_close(kvpress.DuoConfig.load(tmp_path / "pattern").gates, config.gates, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*tmp"))

    model = LlamaForCausalLM.from_pretrained(model_dir)
    kvpress.patch(model, "duo", config=out, sink=4, recent=8)
    assert model.generate(torch.randint(3, 200, (1, 40)), max_new_tokens=4).shape == (1, 44)

    mass = tmp_path / "mass.safetensors"
    assert main(["duo", "--model", str(model_dir), "--out", str(mass), "--method", "attention-mass",
                 "--samples", "2", "--no-progress", *TINY_RECIPE]) == 0
    gates = kvpress.DuoConfig.load(mass).gates
    assert ((gates > 0) & (gates < 1)).all()


def test_command_errors_are_clear(model_dir, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["duo", "--model", str(model_dir), "--out", str(out), "--max-length", "4096"]) == 2
    assert "exceeds the model's max_position_embeddings (1024)" in capsys.readouterr().err
    assert main(["duo", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "cannot load a causal LM" in capsys.readouterr().err
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=384)).save_pretrained(tmp_path / "gpt2")
    ByT5Tokenizer().save_pretrained(tmp_path / "gpt2")
    assert main(["duo", "--model", str(tmp_path / "gpt2"), "--out", str(out), *TINY_RECIPE]) == 2
    assert "supported families" in capsys.readouterr().err
    assert not out.exists()


def test_interrupted_run_resumes_to_the_same_gates(model_dir, tmp_path, monkeypatch):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    recipe = PasskeyRecipe(min_length=300, max_length=500, num_lengths=3, num_passkeys=2, passkey_words=4)
    settings = DuoTraining(steps=8, checkpoint_every=3, sink=8, recent=16)
    data = PasskeyData(ByT5Tokenizer(), recipe, read_haystack())
    uninterrupted = train_gates(model, data, settings, progress=False)

    checkpoint = tmp_path / "duo.safetensors.partial"
    original = PasskeyData.sample

    def failing(self, index):
        if index == 7:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(PasskeyData, "sample", failing)
    with pytest.raises(KeyboardInterrupt):
        train_gates(model, data, settings, checkpoint=checkpoint, progress=False)
    assert torch.load(checkpoint)["step"] == 7  # the interrupt saved the last finished step
    monkeypatch.setattr(PasskeyData, "sample", original)
    calls = []
    monkeypatch.setattr(PasskeyData, "sample", lambda self, i: calls.append(i) or original(self, i))
    resumed = train_gates(model, data, settings, checkpoint=checkpoint, progress=False)
    assert calls == [7]
    torch.testing.assert_close(resumed, uninterrupted)
    assert all(p.requires_grad for p in model.parameters())  # the weights' flags are restored


def test_patch_without_config_uses_shipped_file_or_quick_calibration(model_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("KVPRESS_CACHE", str(tmp_path / "cache"))  # quick gates are cached there
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with caplog.at_level(logging.WARNING, logger="kvpress"):
        kvpress.patch(model, "duo")
    assert "quick calibration steps" in caplog.text and "kvpress-calibrate duo" in caplog.text
    quick = model._kvpress_patch.method.config
    assert quick.gates.shape == (2, 2) and (quick.gates < 1).all() and quick.gates.std() > 0
    assert quick.model_shape.num_layers == 2
    kvpress.unpatch(model)

    shipped = kvpress.DuoConfig(gates=torch.tensor([[0.9, 0.1], [0.2, 0.8]]), sink=4, recent=8)
    shipped.save(model_dir / "kvpress-duo.safetensors")
    try:
        kvpress.patch(model, "duo")
        assert torch.equal(model._kvpress_patch.method.config.gates, shipped.gates)
        kvpress.unpatch(model)
    finally:
        (model_dir / "kvpress-duo.safetensors").unlink()

    caplog.clear()  # the quick gates were cached: the next patch reuses them, no calibration
    with caplog.at_level(logging.INFO, logger="kvpress"):
        kvpress.patch(model, "duo")
    assert "quick calibration steps" not in caplog.text and "cached at" in caplog.text
    assert torch.equal(model._kvpress_patch.method.config.gates, quick.gates)
    kvpress.unpatch(model)

    bare = LlamaForCausalLM(model.config)  # no folder, so no tokenizer
    bare.config._name_or_path = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="kvpress-calibrate duo"):
        kvpress.patch(bare, "duo")
    assert not hasattr(bare.model.layers[0].self_attn, "_kvpress_method")


def test_ctrl_c_before_the_first_checkpoint_keeps_the_work(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "duo.safetensors"
    args = ["duo", "--model", str(model_dir), "--out", str(out), "--steps", "4", "--no-progress", *TINY_RECIPE]
    original = PasskeyData.sample

    def interrupted(self, index):
        if index == 2:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(PasskeyData, "sample", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"kvpress-calibrate: interrupted at step 2 of 4; progress saved to {out}.partial; run the same command to resume" in err
    assert torch.load(f"{out}.partial")["step"] == 2
    monkeypatch.setattr(PasskeyData, "sample", original)
    assert main(args) == 0
    assert "kvpress: resuming from step 2 of 4" in capsys.readouterr().err
    assert out.is_file() and not (tmp_path / "duo.safetensors.partial").exists()


def test_default_lengths_and_passkeys_fit_the_model(model_dir, tmp_path, capsys):
    # max_position_embeddings 1024: the default 1K..32K lengths and 10 passkeys of 32 words cannot fit
    out = tmp_path / "duo.safetensors"
    assert main(["duo", "--model", str(model_dir), "--out", str(out), "--steps", "1", "--no-progress",
                 "--num-lengths", "2", "--train-sink", "8", "--train-recent", "16"]) == 0
    err = capsys.readouterr().err
    assert "kvpress: calibrating at lengths up to 1024 tokens, the model's max_position_embeddings" in err
    assert "shortest calibration sample: 256 tokens" in err
    assert "using 1 of 2 words" in err  # one NATO passkey of 2 words: the byte-level needle takes ~100 tokens
    assert "calibrating on passkeys alone" in err  # the default mix's key-value needles need more than 128 tokens


def test_closing_line_reports_the_progress_bar_quantity(model_dir, tmp_path, capsys):
    out = tmp_path / "duo.safetensors"
    assert main(["duo", "--model", str(model_dir), "--out", str(out), "--steps", "3", "--no-progress", *TINY_RECIPE]) == 0
    gates = kvpress.DuoConfig.load(out).gates
    line = capsys.readouterr().out
    assert f"gates<0.5: {(gates < 0.5).float().mean().item():.0%} (as in the progress bar)" in line
    assert "at sparsity 0.5 (patch time), 2 of 4 heads stream" in line


@pytest.mark.parametrize("kind", ["kvlookup", "multivalue"])
def test_other_calibration_needles_are_exact_and_supervise_their_answers(kind):
    tokenizer = ByT5Tokenizer()
    recipe = PasskeyRecipe(min_length=1200, max_length=1500, num_lengths=2, num_passkeys=3, passkey_words=16, data=kind)
    data = PasskeyData(tokenizer, recipe, read_haystack(), seed=0)
    for index, length in enumerate(recipe.lengths()):
        sample = data.sample(index)
        assert sample.input_ids.shape == (1, length)
        text = tokenizer.decode(sample.input_ids[0])
        context = text[: text.index("\nThe value of key" if kind == "kvlookup" else "\nWhat are all")]
        answers = tokenizer.decode(sample.input_ids[0][sample.supervised])
        if kind == "kvlookup":
            assert len(answers) == 3 * 36 and context.count('": "') == 6  # 3 UUIDs asked of 6 pairs
            assert all(answers[i * 36 : (i + 1) * 36] in context for i in range(3))
        else:
            values = answers.strip().split("; ")
            assert len(values) == 3 and all(len(v.split()) == 2 for v in values)
            assert [context.index(v) for v in values] == sorted(context.index(v) for v in values)  # in order


def test_data_mix_draws_each_kind_and_rejects_unknown_ones():
    tokenizer = ByT5Tokenizer()
    recipe = PasskeyRecipe(min_length=1500, max_length=1500, num_lengths=1, num_passkeys=2, passkey_words=4,
                           data="passkey,kvlookup,multivalue")
    data = PasskeyData(tokenizer, recipe, read_haystack())
    texts = [tokenizer.decode(data.sample(i).input_ids[0]) for i in range(12)]
    assert any("passkey number" in t for t in texts) and any("JSON data" in t for t in texts)
    assert any("codes for" in t for t in texts)
    with pytest.raises(ValueError, match="passkey, kvlookup, multivalue"):
        PasskeyData(tokenizer, PasskeyRecipe(data="passkey,foo"), read_haystack())
