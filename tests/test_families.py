"""Llama-3.x, Qwen2.5, Qwen3 and Mistral as specifications: each loads with its family's flags,
trains with LoRA and QLoRA, saves and reloads exactly; a setting we do not implement is a
one-line error naming the file and the key, never a silently different model.

The checkpoints are ../shared/models/tiny-random-*: real tokenizers and configs, random weights
(128k-152k vocabularies, so sequences and batches stay tiny). Parity with transformers is in
tests/parity/test_families_parity.py.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import lora
from model.checkpoint import check_vocab, folder_untrained_rows, load_pretrained, read_config, save_pretrained
from model.config import Config
from model.errors import SFTError
from model.loss import masked_ce_sum
from model.nf4 import load_quantized
from model.safetensors import load_file, save_file
from model.tokenizer import Tokenizer
from model.untrained import init_rows_to_mean, model_untrained_rows, row_norms

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "data" / "quickstart" / "alpaca_300.jsonl"
FAMILIES = ["llama3", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def folder(shared_file):
    return lambda family: shared_file(f"models/tiny-random-{family}")


def ids(n: int = 1, t: int = 24, seed: int = 0) -> torch.Tensor:
    """Token ids every one of the four vocabularies has (t > Mistral's 16-token window)."""
    return torch.randint(3, 32000, (n, t), generator=torch.Generator().manual_seed(seed))


def mean_loss(model, x) -> torch.Tensor:
    total, n = masked_ce_sum(model, model(x, return_hidden=True), x)
    return total / n


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("family, flags", [
    ("llama3", dict(model_type="llama", tie_word_embeddings=True, eos_token_id=[128001, 128008, 128009])),
    ("qwen2", dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True, vocab_size=151936)),
    ("qwen3", dict(model_type="qwen3", qk_norm=True, head_dim=32, hidden_size=64)),
    ("mistral", dict(model_type="mistral", sliding_window=16, tie_word_embeddings=False)),
])
def test_each_family_loads_with_its_flags(folder, family, flags):
    model = load_pretrained(folder(family))
    assert {k: getattr(model.config, k) for k in flags} == flags
    attn = model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (family == "qwen2") and attn.o_proj.bias is None
    assert hasattr(attn, "q_norm") == (family == "qwen3")
    assert (model.lm_head.weight is model.embed_tokens.weight) == model.config.tie_word_embeddings
    assert Config.from_hf(model.config.to_hf()) == model.config
    if family == "llama3":
        assert model.config.rope_scaling["rope_type"] == "llama3"


def test_transformers_defaults_apply_to_missing_keys(tmp_path):
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4)
    assert Config.from_hf({**base, "model_type": "mistral"}).sliding_window == 4096
    assert Config.from_hf({**base, "model_type": "qwen3"}).head_dim == 128
    qwen = Config.from_hf({**base, "model_type": "qwen2", "use_sliding_window": False,
                           "sliding_window": 131072, "max_window_layers": 21})
    assert qwen.sliding_window is None and qwen.attention_bias


BASE = {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("model_type, edit, key", [
    ("mistral", {"layer_types": ["sliding_attention"] * 2}, "layer_types"),
    ("mistral", {"use_sliding_window": True}, "use_sliding_window"),
    ("mistral", {"model_type": "gemma2"}, "model_type"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"pretraining_tp": 2}, "pretraining_tp"),
    ("llama", {"sliding_window": 4096}, "sliding_window"),
    ("qwen3", {"num_experts": 8, "num_experts_per_tok": 2}, "num_experts"),
    ("llama", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ("llama", {"attention_dropout": 0.1}, "attention_dropout"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ("llama", {"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ("llama", {"rope_theta": "big"}, "rope_theta"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": "4"}}, "factor"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0}}, "original_max_position_embeddings"),
    ("llama", {"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ("qwen2", {"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ("llama", {"eos_token_id": [2, 99999]}, "eos_token_id"),
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("qwen3", {"head_dim": 33}, "head_dim"),
    ("llama", {"hidden_size": 0}, "hidden_size"),
])
def test_unimplemented_or_mistyped_config_is_one_line_naming_file_and_key(tmp_path, model_type, edit, key):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": model_type, **edit}))
    with pytest.raises(SFTError) as err:
        read_config(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "config.json") in msg and key in msg, msg


def test_vocab_smaller_than_the_tokenizer_is_refused_and_a_padded_one_kept(folder):
    qwen = folder("qwen2")
    tok, cfg = Tokenizer.from_pretrained(qwen), read_config(qwen)
    check_vocab(cfg, tok, "q/config.json")          # 151936 rows for 151665 ids: Qwen's padding
    assert load_pretrained(qwen).embed_tokens.weight.shape[0] == 151936
    cfg.vocab_size = 151000
    with pytest.raises(SFTError, match=r"q/config.json: vocab_size 151000 is smaller than the tokenizer's 151665"):
        check_vocab(cfg, tok, "q/config.json")


def test_a_nan_weight_is_refused_at_load_naming_the_tensor(tiny_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_dir, bad)
    tensors = {k: v.clone() for k, v in load_file(bad / "model.safetensors").items()}
    tensors["model.layers.1.input_layernorm.weight"][3] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(SFTError, match=r"model.safetensors: tensor 'model.layers.1.input_layernorm.weight' holds NaN"):
        load_pretrained(bad)


# ----------------------------------------------------------------------------- LoRA and QLoRA

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_lora_and_qlora_train_three_steps_then_save_and_reload_exactly(folder, family, mode, tmp_path):
    path = folder(family)
    base = (lambda: load_quantized(path, torch.float32)) if mode == "qlora" else (lambda: load_pretrained(path))
    torch.manual_seed(0)
    model = lora.apply_lora(base(), r=4, alpha=8, targets="all-linear").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, losses = ids(), []
    for _ in range(3):  # the same batch three times: the loss must fall
        opt.zero_grad()
        loss = mean_loss(model, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[2] < losses[0], losses
    lora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path)
    reloaded = lora.load_adapter(base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reloaded(x))


@pytest.mark.parametrize("edit, key", [
    ({"lora_bias": True}, "lora_bias"), ({"use_dora": "false"}, "use_dora"), ({"use_rslora": "no"}, "use_rslora"),
    ({"lora_alpha": "16"}, "lora_alpha"), ({"lora_dropout": 1.5}, "lora_dropout"), ({"r": 0}, "'r'"),
    ({"modules_to_save": ["score"]}, "modules_to_save"), ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"target_modules": []}, "target_modules"), ({"bias": "all"}, "bias"),
])
def test_adapter_config_keys_are_typed_and_unimplemented_features_refused(adapter_dir, tmp_path, edit, key):
    folder = tmp_path / "a"
    shutil.copytree(adapter_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(SFTError) as err:
        lora.read_adapter_config(folder)
    msg = str(err.value)
    assert "\n" not in msg and str(folder / "adapter_config.json") in msg and key in msg, msg


def test_peft_keys_left_off_are_accepted(adapter_dir, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(adapter_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    peft_extras = {"peft_version": "0.21.2", "exclude_modules": None, "loftq_config": {}, "use_qalora": False,
                   "qalora_group_size": 16, "lora_bias": False, "target_parameters": None, "megatron_core": "megatron.core"}
    (folder / "adapter_config.json").write_text(json.dumps({**config, **peft_extras}))
    assert lora.read_adapter_config(folder).r == 4


def _random_biases(model, seed: int = 3) -> None:
    """The tiny checkpoints' biases are transformers' zeros: make them count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_lora_merge_adds_to_the_weight_and_leaves_the_bias(folder):
    model = load_pretrained(folder("qwen2"))
    _random_biases(model)
    lora.apply_lora(model, r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj"))
    layer = model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    weight, bias, delta = layer.base_layer.weight.clone(), layer.base_layer.bias.clone(), layer.delta_weight()
    x = ids()
    with torch.no_grad():
        before = model(x)
        lora.merge_lora(model)
        after = model(x)
    merged = model.layers[0].self_attn.q_proj
    assert type(merged) is torch.nn.Linear and torch.equal(merged.bias, bias)
    torch.testing.assert_close(merged.weight, weight + delta, rtol=0, atol=1e-7)
    # fp32: merged (W + dW) x vs W x + dW x differ by summation order, ~1e-7 of values ~1
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_merged_qlora_export_keeps_biases_and_the_tied_head(folder, tmp_path):
    path = folder("qwen2")
    model = lora.apply_lora(load_quantized(path, torch.float32), r=4, alpha=8, targets="all-linear")
    _random_biases(model)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    tok = Tokenizer.from_pretrained(path)
    lora.save_merged(model, tmp_path / "merged", tokenizer=tok)
    names = set(load_file(tmp_path / "merged" / "model.safetensors"))
    assert "lm_head.weight" not in names and "model.layers.0.self_attn.q_proj.bias" in names
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    assert Tokenizer.from_pretrained(tmp_path / "merged").encode("Hi <|im_end|>") == tok.encode("Hi <|im_end|>")
    reloaded = load_pretrained(tmp_path / "merged")
    assert reloaded.config.tie_word_embeddings and reloaded.config.model_type == "qwen2"
    x = ids()
    with torch.no_grad():  # dequantized W + dW in one weight vs two products: fp32 summation order
        torch.testing.assert_close(reloaded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_full_save_writes_what_tie_word_embeddings_says_and_reloads_bit_identically(folder, family, tmp_path):
    model = load_pretrained(folder(family))
    save_pretrained(model, tmp_path / "out", tokenizer=Tokenizer.from_pretrained(folder(family)))
    names = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert ("lm_head.weight" in names) == (not model.config.tie_word_embeddings)
    reloaded = load_pretrained(tmp_path / "out")
    assert reloaded.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- sliding window

def test_sliding_window_packed_row_equals_each_sample_alone(folder):
    model = load_pretrained(folder("mistral"))
    a, b = ids(t=20, seed=1)[0], ids(t=30, seed=2)[0]  # both longer than the 16-token window
    row = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(20), torch.arange(30)])[None]
    seq = torch.tensor([0] * 20 + [1] * 30)[None]
    with torch.no_grad():
        packed = model(row, position_ids=pos, seq_ids=seq)[0]
        alone_a, alone_b = model(a[None])[0], model(b[None])[0]
        # fp32 attention over differently shaped masks: equal up to summation order
        torch.testing.assert_close(packed[:20], alone_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[20:], alone_b, rtol=1e-5, atol=1e-5)
        model.config.sliding_window = None   # the window is what makes the difference here
        assert (model(b[None])[0] - alone_b).abs().max() > 1e-3


def test_sliding_window_batched_generation_equals_each_prompt_alone(folder):
    model = load_pretrained(folder("mistral"))
    prompts = [ids(t=40, seed=3)[0].tolist(), ids(t=19, seed=4)[0].tolist()]  # left padding: 21
    batched = model.generate(prompts, max_new_tokens=12, stop_ids=())
    assert batched == [model.generate([p], max_new_tokens=12, stop_ids=())[0] for p in prompts]


# ----------------------------------------------------------------------------- untrained rows

def test_untrained_special_rows_are_found_and_set_to_the_mean_of_trained_rows(folder, tmp_path):
    path = folder("llama3")
    model = load_pretrained(path)
    assert model_untrained_rows(model, range(model.config.vocab_size)) == []  # random: all alike
    eot, header = 128009, 128006
    with torch.no_grad():
        model.embed_tokens.weight[[eot, header]] = 0.0
    assert model_untrained_rows(model, [eot, header, 1000]) == [header, eot]
    tok = Tokenizer.from_pretrained(path)
    save_pretrained(model, tmp_path / "base", tokenizer=tok)
    assert folder_untrained_rows(tmp_path / "base", [eot, 1000]) == [eot]   # read from the files
    trained = torch.ones(model.config.vocab_size, dtype=torch.bool)
    trained[[eot, header]] = False
    mean = model.embed_tokens.weight[trained].float().mean(0)
    init_rows_to_mean(model, [header, eot])
    # stored in bf16: 8 significant bits, a relative rounding of at most 2^-8
    torch.testing.assert_close(model.embed_tokens.weight[eot].float(), mean, rtol=2**-8, atol=1e-9)
    torch.testing.assert_close(model.embed_tokens.weight[header], model.embed_tokens.weight[eot], rtol=0, atol=0)
    assert row_norms(model.lm_head.weight)[eot] > 0   # the tied head is the embedding


def test_inspect_warns_about_untrained_special_rows(folder, tmp_path, capsys):
    from data.inspect import main as inspect_main
    path = folder("llama3")
    model = load_pretrained(path)
    with torch.no_grad():
        model.embed_tokens.weight[128009] = 0.0   # <|eot_id|>, which the llama3.2 template uses
    save_pretrained(model, tmp_path / "base", tokenizer=Tokenizer.from_pretrained(path))
    assert inspect_main(["--model", str(tmp_path / "base"), "--data", str(QUICKSTART), "-n", "1",
                         "--html", str(tmp_path / "x.html")]) == 0
    out = capsys.readouterr().out
    assert "1 special token(s)" in out and "'<|eot_id|>' (128009)" in out and "init_untrained_tokens" in out



def test_training_checks_only_the_special_ids_its_real_tokens_use(folder):
    """training/loop.check_untrained_tokens: a special id in a real position is flagged (and with
    fix=True set to the mean), the same id only in padding or a plain id with a zero row is not."""
    from types import SimpleNamespace

    from training.loop import check_untrained_tokens
    path = folder("llama3")
    model, tok = load_pretrained(path), Tokenizer.from_pretrained(path)
    eot, header, plain = 128009, 128006, 1000
    with torch.no_grad():
        model.embed_tokens.weight[[eot, header, plain]] = 0.0
    ids = torch.tensor([[5, eot, plain, header]], dtype=torch.int32)
    seq = torch.tensor([[0, 0, 0, -1]], dtype=torch.int16)   # the header id sits in padding
    data = SimpleNamespace(train={"input_ids": ids, "seq_ids": seq})
    said = []
    check_untrained_tokens(model, data, tok, fix=False, log=said.append)
    assert len(said) == 1 and "1 special token(s)" in said[0] and "(128009)" in said[0]
    check_untrained_tokens(model, data, tok, fix=True, log=said.append)
    assert "initialised" in said[1] and row_norms(model.embed_tokens.weight)[eot] > 0
    assert row_norms(model.embed_tokens.weight)[header] == 0

# ----------------------------------------------------------------------------- downstream

@pytest.mark.parametrize("family, stops", [
    ("llama3", {128001, 128008, 128009}),     # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    ("qwen2", {151643, 151645}),              # <|endoftext|>, <|im_end|>
    ("qwen3", {151643, 151645}),
])
def test_replies_stop_on_every_end_of_turn_id(folder, family, stops):
    from data.chat import chat_for
    path = folder(family)
    chat = chat_for(path, Tokenizer.from_pretrained(path), "auto", read_config(path).eos_ids)
    assert stops <= set(chat.stop_ids)


RECIPES = [("llama3.2-1b-lora", "llama3", []), ("qwen2.5-qlora", "qwen2", []), ("qwen3-full", "qwen3", []),
           ("llama3.2-1b-lora", "mistral", [])]  # every recipe: data.template = "auto"


@pytest.mark.parametrize("recipe, family, extra", RECIPES)
def test_recipe_trains_a_few_steps_on_the_tiny_folder(folder, recipe, family, extra, tmp_path, capsys):
    from training.config import load_config
    from training.loop import train
    cfg = load_config(ROOT / "configs" / f"{recipe}.toml", [
        f"model.path={folder(family)}", f"run.out_dir={tmp_path}", f"data.train={QUICKSTART}",
        "data.max_records=10", "data.max_seq_len=64", "data.eval_fraction=0.2", "train.batch_size=2",
        "train.grad_accum=1", "train.max_steps=3", "run.save_every=0", "eval.sample_prompts=1",
        "eval.max_new_tokens=4", "lora.save_merged=false", *extra])
    summary = train(cfg)
    final = Path(summary["final"])
    assert summary["steps"] == 3 and summary["eval_after"] is not None
    if cfg.model.finetune == "full":
        assert load_pretrained(final).config.model_type == read_config(folder(family)).model_type
        assert (final / "tokenizer_config.json").exists()
    assert "sample (held-out prompt, greedy)" in capsys.readouterr().out
    if cfg.model.finetune != "full":  # an adapter names its base, so eval.py can say what to pass
        import eval as eval_cli
        adapter = json.loads((final / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(folder(family))
        assert eval_cli.main(["--model", str(final), "--tasks", "samples"]) == 2
        assert f"pass --model {folder(family)} --adapter {final}" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_runs_loss_and_samples_on_each_family(folder, family, tmp_path):
    import eval as eval_cli
    assert eval_cli.main(["--model", str(folder(family)), "--tasks", "loss,samples", "--data", str(QUICKSTART),
                          "--limit", "2", "--samples", "1", "--max-new-tokens", "4", "--max-len", "64",
                          "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"]["loss"]["metrics"]


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_runs_on_each_family_with_its_own_template(folder, family, tmp_path, capsys):
    from data.inspect import main
    assert main(["--model", str(folder(family)), "--data", str(QUICKSTART), "--max-len", "64", "-n", "1",
                 "--html", str(tmp_path / "page.html")]) == 0
    out = capsys.readouterr().out
    assert "no chat template" not in out and "per part:" in out and (tmp_path / "page.html").exists()


def test_tool_recipe_trains_on_both_tool_files_and_toolcall_eval_runs_before_and_after(
        shared_file, tmp_path, capsys):
    """configs/qwen3-tools.toml: both shared tool files mixed, LoRA on tiny-random-qwen3, and
    eval.py --tasks toolcall before and after (a few steps: the plumbing, not the scores)."""
    import eval as eval_cli
    from training.config import load_config
    from training.loop import train
    qwen3, glaive = shared_file("models/tiny-random-qwen3"), shared_file("data/llamafactory_glaive_toolcall_en_demo.json")
    shared_file("data/llamafactory_reason_tool_use_demo_50.jsonl")
    cfg = load_config(ROOT / "configs" / "qwen3-tools.toml", [
        f"model.path={qwen3}", f"run.out_dir={tmp_path}", "train.max_steps=2", "train.batch_size=2",
        "data.max_seq_len=512", "eval.sample_prompts=0", f"data.cache_dir={tmp_path / 'cache'}"])
    assert len(cfg.data.sources) == 2
    summary = train(cfg)
    report = json.loads((tmp_path / "qwen3-tools" / "data_report.json").read_text())
    assert summary["steps"] == 2 and len(report["sources"]) == 2
    args = ["--tasks", "toolcall", "--data", str(glaive), "--limit", "3", "--max-new-tokens", "8"]
    assert eval_cli.main(["--model", str(qwen3), *args, "--out", str(tmp_path / "base")]) == 0
    assert eval_cli.main(["--model", str(qwen3), "--adapter", summary["final"], *args,
                          "--out", str(tmp_path / "tuned")]) == 0
    metrics = json.loads((tmp_path / "tuned" / "eval.json").read_text())["tasks"]["toolcall"]["metrics"]
    assert {"call_parse_rate", "call_name_acc", "call_args_acc", "text_no_call_rate"} <= set(metrics)
    assert eval_cli.main(["compare", str(tmp_path / "base"), str(tmp_path / "tuned")]) == 0
    assert "toolcall.call_name_acc" in capsys.readouterr().out
