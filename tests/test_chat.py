"""The chat seam (data/chat.py): prompts use the model's own chat template (or say which
fallback they use), every end-of-turn id stops a reply, and batched replies come back in the
caller's order, equal to one-at-a-time generation."""
import pytest

from data.chat import chat_for, cut_at_stop
from evaluation.generation import load_eval_model
from model import Tokenizer
from model.errors import SFTError


def test_base_model_without_template_falls_back_to_alpaca_and_says_so(pico_dir):
    em = load_eval_model(pico_dir)
    assert em.template == "alpaca" and "no chat template" in em.notes[0]
    ids = em.chat.prompt_ids([{"role": "user", "content": "Hi"}])
    assert ids[0] == em.tokenizer.bos_id
    assert em.tokenizer.decode(ids).endswith("### Response:\n")


def test_checkpoint_template_is_used_and_override_is_noted(tiny_llama2_dir):
    em = load_eval_model(tiny_llama2_dir)
    assert em.template == "llama2" and em.notes == []
    text = em.tokenizer.decode(em.chat.prompt_ids([{"role": "user", "content": "Hi"}]))
    assert text.strip().endswith("[/INST]")
    other = load_eval_model(tiny_llama2_dir, template="chatml")
    assert other.template == "chatml" and "overriding" in other.notes[0]
    with pytest.raises(SFTError, match="--template 'chatgpt': unknown"):
        load_eval_model(tiny_llama2_dir, template="chatgpt")


def test_batched_replies_keep_order_and_equal_single_generation(pico_dir):
    em = load_eval_model(pico_dir)
    convs = [[{"role": "user", "content": t}] for t in
             ["Name a color.", "Write one long sentence about the sea and the ships upon it.", "Why?", "Tell a tale."]]
    batched = em.chat.replies(em.model, convs, max_new_tokens=6, batch_size=3)
    single = [em.chat.replies(em.model, [c], max_new_tokens=6, batch_size=1)[0] for c in convs]
    assert batched == single and all(batched)


def test_replies_are_cut_at_the_templates_stop_string():
    assert cut_at_stop("Paris.<|im_end|>\n<|im_start|>user", ["<|im_end|>"]) == "Paris."
    assert cut_at_stop("  no stop here ", ["</s>"]) == "no stop here"


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SFTError, match="not a model folder"):
        load_eval_model(tmp_path)
    with pytest.raises(SFTError, match="--dtype 'float8'"):
        (tmp_path / "config.json").write_text("{}")
        load_eval_model(tmp_path, dtype="float8")


def test_stop_ids_are_eos_template_markers_and_the_config_eos_ids(pico_dir):
    tok = Tokenizer.from_pretrained(pico_dir)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    chat = chat_for(pico_dir, tok, "chatml", model_eos_ids=[7])
    assert chat.stop_ids == sorted({tok.eos_id, tok.token_to_id("<|im_end|>"), 7})
    assert chat.stop_strings == ["<|im_end|>"] and chat.note is None


def test_unknown_template_names_the_option_of_the_tool(pico_dir):
    tok = Tokenizer.from_pretrained(pico_dir)
    with pytest.raises(SFTError, match="data.template 'chatm': unknown template"):
        chat_for(pico_dir, tok, "chatm")
    with pytest.raises(SFTError, match=r"\[teacher\] template 'x': unknown template"):
        chat_for(pico_dir, tok, "x", option="[teacher] template")
