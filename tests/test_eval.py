"""Unit tests of the evaluation harness (kvpress.eval): task format, determinism, scoring,
perplexity and the CLI, on a tiny random Llama with needle-llama's byte-level tokenizer."""

import json
import math
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvpress.eval import TASKS, evaluate_task, load_corpus, make_sample, perplexity, score
from kvpress.eval.cli import main as eval_main
from kvpress.eval.cli import run as eval_run

MODEL_DIR = os.path.join(os.path.dirname(__file__), "..", "models", "needle-llama")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def haystack():
    return load_corpus("heldout")


def tiny_byte_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=256, bos_token_id=257, eos_token_id=258,
    )
    return LlamaForCausalLM(config).eval()


def n_tokens(tokenizer, sample):
    return len(tokenizer(sample.prompt).input_ids) + len(tokenizer.encode(sample.answer, add_special_tokens=False))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [512, 1500, 4096])
def test_sample_has_exact_length_and_contains_its_answer(tokenizer, haystack, task, length):
    s = make_sample(task, tokenizer, haystack, length, depth=0.5, seed=3)
    assert n_tokens(tokenizer, s) == length
    assert s.task == task and s.length == length
    assert s.answer not in s.prompt.rsplit("\n\n", 1)[1]  # the question does not give the answer away
    for value in s.values:
        assert value in s.prompt  # ... the needles do
    if task == "multivalue":
        assert s.answer == ", ".join(s.values)
        positions = [s.prompt.index(v) for v in s.values]
        assert positions == sorted(positions)  # in order of appearance


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_needle_sits_at_its_depth(tokenizer, haystack, depth):
    s = make_sample("passkey", tokenizer, haystack, 4096, depth=depth, seed=1)
    at = s.prompt.index(f"The pass key is {s.answer}")
    # snapped back to the start of a line or sentence: at most a line's length before the depth
    assert depth * 4096 - 400 <= at <= depth * 4096 + 10


def test_samples_are_deterministic_for_a_seed(tokenizer, haystack):
    a = make_sample("multikey", tokenizer, haystack, 2048, 0.25, seed=7)
    b = make_sample("multikey", tokenizer, haystack, 2048, 0.25, seed=7)
    c = make_sample("multikey", tokenizer, haystack, 2048, 0.25, seed=8)
    assert a == b
    assert a.prompt != c.prompt and a.answer != c.answer


def test_followup_questions_fit_the_length(tokenizer, haystack):
    s = make_sample("multikey", tokenizer, haystack, 2048, 0.5, seed=0, num_needles=5, questions=5)
    assert len(s.followups) == 4
    total = n_tokens(tokenizer, s) + sum(len(tokenizer.encode(q + a, add_special_tokens=False)) for q, a in s.followups)
    assert total == 2048
    assert all(a in s.prompt for _, a in s.followups)


def test_other_tokenizers_get_close_lengths(haystack):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([haystack[:200_000]], trainers.BpeTrainer(vocab_size=600, special_tokens=["[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]")
    for task in TASKS:
        s = make_sample(task, tok, haystack, 1024, 0.5, seed=0)
        assert abs(n_tokens(tok, s) - 1024) <= 8


def test_score():
    s = make_sample("multivalue", AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True), "word " * 500, 512, 0.2, 0)
    assert score(s, s.answer) == 1.0
    assert score(s, ", ".join(s.values[:2])) == pytest.approx(2 / len(s.values))
    p = make_sample("passkey", AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True), "word " * 500, 512, 0.2, 0)
    assert score(p, " " + p.answer + " ") == 1.0
    assert score(p, p.answer[:-1]) == 0.0


def test_evaluate_task_is_deterministic_and_reports_cache_bytes(tokenizer, haystack):
    model = tiny_byte_model()
    runs = [evaluate_task(model, tokenizer, "passkey", haystack, [256, 512], [0.0, 1.0], 2, seed=5, progress=False) for _ in range(2)]
    assert runs[0].to_dict() == runs[1].to_dict()
    r = runs[0]
    assert set(r.grid) == {256, 512} and set(r.grid[256]) == {0.0, 1.0}
    # an unpatched model holds a dense cache: 2 x layers x KV heads x head dim x tokens x 4 bytes
    assert r.cache_bytes == r.dense_cache_bytes
    assert r.cache_bytes[512] == pytest.approx(2 * 2 * 2 * 16 * (512 - 1) * 4)


def test_perplexity_matches_the_model_loss(tokenizer):
    model = tiny_byte_model()
    text = "The quick brown fox jumps over the lazy dog. " * 10
    r = perplexity(model, tokenizer, text, context=64, max_tokens=63, progress=False)
    ids = tokenizer(text[:63], return_tensors="pt").input_ids  # BOS + 63 bytes: one window
    loss = model(ids, labels=ids).loss.item()
    assert r["tokens"] == 63
    assert r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert r["bits_per_byte"] == pytest.approx(loss / math.log(2), rel=1e-4)  # one byte per token


def test_cli_writes_json(tmp_path, tokenizer):
    model = tiny_byte_model()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "r.json"
    eval_main(
        ["--model", str(tmp_path / "m"), "--tasks", "passkey,kvlookup,ppl", "--lengths", "600", "--depths", "2",
         "--samples", "1", "--ppl-tokens", "500", "--ppl-context", "256", "--device", "cpu", "--no-progress",
         "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"passkey", "kvlookup", "ppl"}
    grid = report["results"]["passkey"]["grid"]
    assert list(grid) == ["600"] and list(grid["600"]) == ["0.0", "1.0"]
    assert report["results"]["passkey"]["accuracy"] == sum(grid["600"].values()) / 2
    cells = report["results"]["passkey"]["scores"]  # [length, depth, sample, score] per cell
    assert [c[:3] for c in cells] == [[600, 0.0, 0], [600, 1.0, 0]] and [c[3] for c in cells] == list(grid["600"].values())
    assert report["results"]["ppl"]["tokens"] == 500  # windows of BOS + 255 and BOS + 245 tokens, all predicted
    assert report["config"]["depths"] == [0.0, 1.0]
    assert report["environment"]["torch"] == torch.__version__


def test_cli_evaluates_a_duo_patched_model(tmp_path, tokenizer):
    import kvpress

    model = tiny_byte_model()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    gates = torch.tensor([[1.0, 0.2], [0.1, 0.9]])  # 2 layers x 2 KV heads
    kvpress.DuoConfig(gates=gates, sink=4, recent=32).save(tmp_path / "duo.safetensors")
    report = eval_run(
        ["--model", str(tmp_path / "m"), "--tasks", "passkey", "--lengths", "300", "--depths", "0.5",
         "--samples", "1", "--device", "cpu", "--no-progress", "--duo-config", str(tmp_path / "duo.safetensors"),
         "--duo-sparsity", "0.75"]
    )
    assert report["duo"]["retrieval_heads"] == [[1, 0], [0, 0]]  # the top quarter of the gates
    r = report["results"]["passkey"]
    # one of four heads keeps 299 tokens, three keep sink + recent = 36: far below a dense cache
    assert r["cache_bytes"][300] < 0.5 * r["dense_cache_bytes"][300]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("eval") / "tiny-llama"
    tiny_byte_model().save_pretrained(path)  # max_position_embeddings 2048 (LlamaConfig default)
    tokenizer.save_pretrained(path)
    return path


def test_cli_exits_0_and_prints_no_report_to_stderr(saved_tiny, capsys):
    code = eval_main(["--model", str(saved_tiny), "--tasks", "passkey", "--lengths", "300", "--depths", "1",
                      "--samples", "1", "--device", "cpu", "--no-progress"])
    assert code == 0  # the console script passes it to sys.exit
    out, err = capsys.readouterr()
    assert out.startswith("passkey") and "results" not in err


@pytest.mark.parametrize("args, message", [
    (["--tasks", "passkey,foo"], "argument --tasks: unknown task(s) foo"),
    (["--duo-config", "nowhere.safetensors"], "argument --duo-config: nowhere.safetensors not found"),
    (["--lengths", "20"], "argument --lengths: length 20 is too short for task 'passkey'"),
    (["--lengths", "1024,4096"], "argument --lengths: 4096 exceeds the model's max_position_embeddings (2048)"),
    (["--depths", "0,1.5"], "argument --depths: depths are fractions in [0, 1]"),
    (["--duo-sparsity", "0.5"], "--duo-sparsity / --duo-threshold need --duo-config FILE"),
    (["--heatmap", "x.png", "--tasks", "kvlookup"], "add passkey to --tasks"),
])
def test_cli_rejects_bad_arguments_before_loading_the_model(saved_tiny, monkeypatch, capsys, args, message):
    import kvpress.eval.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--model", str(saved_tiny), "--device", "cpu", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("kvpress-eval: error: ")


def test_cli_heatmap_needs_matplotlib(saved_tiny, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit):
        eval_main(["--model", str(saved_tiny), "--heatmap", "x.png"])
    assert "argument --heatmap: needs matplotlib" in capsys.readouterr().err


def test_cli_version(capsys):
    import kvpress

    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--version"])
    assert exit_info.value.code == 0 and kvpress.__version__ in capsys.readouterr().out


def test_heatmap_title_names_the_model_folder_and_method(saved_tiny, tmp_path, monkeypatch):
    import kvpress
    import kvpress.eval.cli as cli

    titles = []
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())  # matplotlib "installed"
    monkeypatch.setattr(cli, "heatmap", lambda result, path, title: titles.append(title) or True)
    kvpress.DuoConfig(gates=torch.tensor([[1.0, 0.2], [0.1, 0.9]]), sink=4, recent=32).save(tmp_path / "duo.safetensors")
    eval_run(["--model", str(saved_tiny), "--tasks", "passkey", "--lengths", "300", "--depths", "1", "--samples", "1",
              "--device", "cpu", "--no-progress", "--heatmap", str(tmp_path / "h.png"),
              "--duo-config", str(tmp_path / "duo.safetensors")])
    assert titles[0].startswith("passkey on tiny-llama: ")
    assert "DuoAttention: 2 of 4 KV heads retrieval (sparsity 0.5), streaming sink 4 + recent 32" in titles[0]


def test_chat_samples_use_the_template_and_keep_their_length(haystack):
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    for task in ("passkey", "people"):
        s = make_sample(task, tok, haystack, 1024, 0.5, seed=0, chat=True)
        assert s.chat and s.prompt.startswith("<|user|>") and "?<|end|><|assistant|>" in s.prompt
        assert s.prompt.endswith(" is ") or s.prompt.endswith("city of ")  # the reply starts with the lead
        ids = tok(s.prompt, add_special_tokens=False).input_ids + tok.encode(s.answer, add_special_tokens=False)
        assert len(ids) == 1024 and s.answer in s.prompt.split("<|end|>")[0]
    with pytest.raises(ValueError, match="follow-up"):
        make_sample("multikey", tok, haystack, 1024, 0.5, seed=0, chat=True, questions=2)


def test_cli_evaluates_any_method_with_its_config_and_options(saved_tiny, tmp_path):
    """--method / --config / --option patch the model as kvpress.patch(model, method, config, **options)."""
    import kvpress

    gates = torch.tensor([[1.0, 0.2], [0.1, 0.9]])
    kvpress.DuoConfig(gates=gates, sink=4, recent=32).save(tmp_path / "duo.safetensors")
    common = ["--model", str(saved_tiny), "--tasks", "passkey", "--lengths", "300", "--depths", "0.5",
              "--samples", "1", "--device", "cpu", "--no-progress"]
    short = eval_run([*common, "--duo-config", str(tmp_path / "duo.safetensors"), "--duo-sparsity", "0.75"])
    long = eval_run([*common, "--method", "duo", "--config", str(tmp_path / "duo.safetensors"),
                     "--option", "sparsity=0.75"])
    assert long["duo"] == short["duo"] and long["duo"]["retrieval_heads"] == [[1, 0], [0, 0]]
    assert long["results"]["passkey"]["cache_bytes"] == short["results"]["passkey"]["cache_bytes"]
    assert long["method"] == {"method": "duo", "config": str(tmp_path / "duo.safetensors"), "options": {"sparsity": 0.75}}
    sparse = eval_run([*common, "--method", "minference", "--option", "min_length=0", "--option", "max_work=None",
                       "--option", "vertical_size=30", "--option", "slash_size=60"])
    assert sparse["duo"] is None and sparse["method"]["options"] == {
        "min_length": 0, "max_work": None, "vertical_size": 30, "slash_size": 60}
    dense = eval_run([*common, "--method", "dense"])  # kvpress's full cache (capacity and bookkeeping counted)
    assert sparse["results"]["passkey"]["cache_bytes"] == dense["results"]["passkey"]["cache_bytes"]  # prefill only
    composed = eval_run([*common, "--method", "minference+duo", "--config", f"duo={tmp_path / 'duo.safetensors'}"])
    assert composed["method"]["config"] == {"duo": str(tmp_path / "duo.safetensors")}
    assert composed["duo"]["retrieval_heads"] == [[1, 0], [0, 1]]


@pytest.mark.parametrize("args, message", [
    (["--method", "fast"], "argument --method: unknown method(s) fast"),
    (["--config", "x.json"], "--config / --option need --method NAME"),
    (["--method", "duo", "--config", "nowhere.safetensors"], "argument --config: nowhere.safetensors not found"),
    (["--method", "minference+duo", "--config", "x"], "give METHOD=FILE (METHOD one of minference, duo)"),
    (["--method", "duo", "--option", "sparsity"], "argument --option: expected FIELD=VALUE"),
    (["--method", "palu", "--duo-config", "x"], "--duo-config is short for --method duo --config FILE"),
])
def test_cli_rejects_bad_method_arguments_before_loading_the_model(saved_tiny, monkeypatch, capsys, args, message):
    import kvpress.eval.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--model", str(saved_tiny), "--device", "cpu", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
