"""Evaluation prompts use the model's own chat template (or say which fallback they use), and
batched replies come back in the caller's order, equal to one-at-a-time generation."""
import pytest

from evaluation.generation import cut_at_stop, generate_replies, load_eval_model, prompt_ids
from model.errors import SFTError


def test_base_model_without_template_falls_back_to_alpaca_and_says_so(pico_dir):
    em = load_eval_model(pico_dir)
    assert em.template == "alpaca" and "no chat template" in em.notes[0]
    ids = prompt_ids(em, [{"role": "user", "content": "Hi"}])
    assert ids[0] == em.tokenizer.bos_id
    assert em.tokenizer.decode(ids).endswith("### Response:\n")


def test_checkpoint_template_is_used_and_override_is_noted(tiny_llama2_dir):
    em = load_eval_model(tiny_llama2_dir)
    assert em.template == "llama2" and em.notes == []
    text = em.tokenizer.decode(prompt_ids(em, [{"role": "user", "content": "Hi"}]))
    assert text.strip().endswith("[/INST]")
    other = load_eval_model(tiny_llama2_dir, template="chatml")
    assert other.template == "chatml" and "overriding" in other.notes[0]
    with pytest.raises(SFTError, match="--template 'chatgpt': unknown"):
        load_eval_model(tiny_llama2_dir, template="chatgpt")


def test_batched_replies_keep_order_and_equal_single_generation(pico_dir):
    em = load_eval_model(pico_dir)
    convs = [[{"role": "user", "content": t}] for t in
             ["Name a color.", "Write one long sentence about the sea and the ships upon it.", "Why?", "Tell a tale."]]
    batched = generate_replies(em, convs, max_new_tokens=6, batch_size=3)
    single = [generate_replies(em, [c], max_new_tokens=6, batch_size=1)[0] for c in convs]
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
