"""data.masking: input_ids are the tokens of the rendered text; labels keep exactly the replies."""
import pytest

from data.masking import IGNORE_INDEX, TokenBoundaryError, tokenize_conversation, tokenize_dataset, tokenize_segments
from data.templates import TEMPLATES, render
from model.tokenizer import Tokenizer

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?\n"},
        {"role": "assistant", "content": "Rome, since 1871."}]


@pytest.fixture(scope="module")
def pico(pico_dir):
    return Tokenizer.from_pretrained(pico_dir)


def trained_runs(sample):
    """Maximal runs of trained token ids."""
    runs, cur = [], []
    for i, l in zip(sample["input_ids"], sample["labels"]):
        if l != IGNORE_INDEX:
            assert l == i  # labels are aligned with input_ids, not shifted
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("template", ["alpaca", "llama2", "mistral", "zephyr", "vicuna"])
def test_labels_mask_everything_but_assistant_turns(pico, template):
    s = tokenize_conversation(pico, template, CONV)
    assert s["input_ids"] == pico.encode(render(template, CONV, bos_token="<s>", eos_token="</s>"))
    runs = trained_runs(s)
    assert ["".join(pico.decode(r).split()) for r in runs] == ["Paris.</s>", "Rome,since1871.</s>"]
    assert all(r[-1] == pico.eos_id for r in runs)  # the EOS after each reply is trained


def test_llama2_tokenizer_and_template_train_exactly_the_replies(tiny_llama2_dir):
    tok = Tokenizer.from_pretrained(tiny_llama2_dir)
    s = tokenize_conversation(tok, "llama2", CONV)
    assert s["input_ids"][0] == tok.bos_id and s["input_ids"].count(tok.bos_id) == 2
    assert [tok.decode(r) for r in trained_runs(s)] == ["Paris. </s>", "Rome, since 1871. </s>"]


def test_strategies_train_on_last_and_train_on_all(pico):
    last = tokenize_conversation(pico, "alpaca", CONV, strategy="train_on_last")
    assert ["".join(pico.decode(r).split()) for r in trained_runs(last)] == ["Rome,since1871.</s>"]
    everything = tokenize_conversation(pico, "alpaca", CONV, strategy="train_on_all")
    assert everything["labels"] == everything["input_ids"]


def test_truncation_keeps_partial_replies_and_drops_samples_with_nothing_to_train(pico):
    full = tokenize_conversation(pico, "alpaca", CONV)
    first_trained = next(i for i, l in enumerate(full["labels"]) if l != IGNORE_INDEX)
    cut = tokenize_conversation(pico, "alpaca", CONV, max_len=first_trained + 2)
    assert cut["input_ids"] == full["input_ids"][:first_trained + 2]
    assert sum(l != IGNORE_INDEX for l in cut["labels"]) == 2
    assert tokenize_conversation(pico, "alpaca", CONV, max_len=first_trained) is None
    samples, report = tokenize_dataset(pico, "alpaca", [CONV, CONV[:3]], max_len=first_trained)
    assert samples == [] and report.dropped_no_trainable == [0, 1]
    samples, report = tokenize_dataset(pico, "alpaca", [CONV, CONV[:3]], max_len=first_trained + 2)
    assert report.kept == 2 and report.truncated == 2 and report.trainable_tokens == 4


class MergingTokenizer:
    """Characters are tokens, except that "ab" is one token: a boundary between a and b breaks."""
    bos_token, eos_token = "<s>", "</s>"

    def encode(self, text, bos=False, eos=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def test_token_across_the_prompt_response_boundary_is_reported_not_mislabelled():
    ids, flags = tokenize_segments(MergingTokenizer(), [("xa", False), ("cd", True)])
    assert ids == [ord("x"), ord("a"), ord("c"), ord("d")] and flags == [False, False, True, True]
    with pytest.raises(TokenBoundaryError, match=r"data.jsonl line 7: .*before 'bd'"):
        tokenize_segments(MergingTokenizer(), [("xa", False), ("bd", True)], where="data.jsonl line 7")


def test_template_tokens_the_tokenizer_does_not_know_are_caught(tiny_llama2_dir):
    """Llama-3 markup with the Llama-2 tokenizer: '|><|' merges across turns; the sample is reported."""
    tok = Tokenizer.from_pretrained(tiny_llama2_dir)
    samples, report = tokenize_dataset(tok, "llama3", [CONV, CONV[1:3]], source="chat.json")
    assert report.dropped_boundary == [0] and report.kept == 1
    assert "1 with a token across a prompt/response boundary (samples [0])" in report.summary()


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_template_tokenizes_the_shared_chat_data_with_pico(pico, shared_file, template):
    from data.formats import load_conversations
    convs = load_conversations(shared_file("data/fastchat_dummy_conversation.json"))[:40]
    samples, report = tokenize_dataset(pico, template, convs, max_len=512)
    replies = [sum(m["role"] == "assistant" for m in conv) for conv in convs]
    assert report.conversations == 40 and not report.dropped_boundary and report.kept == report.samples
    if template == "qwen3":  # one sample per user query, each training its own reply (see test_masking_tools.py)
        assert report.kept == sum(replies) > 40 and all(len(trained_runs(s)) == 1 for s in samples)
        return
    assert report.kept == 40
    for s, n in zip(samples, replies):
        assert len(trained_runs(s)) == n


def test_inspect_cli_marks_trained_spans_and_writes_an_html_page(pico_dir, tmp_path, capsys):
    import json
    from data.inspect import main
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi there"}]))
    page = tmp_path / "out" / "page.html"
    assert main(["--data", str(data), "--model", str(pico_dir), "--template", "alpaca", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "### Response:\n[[Hi there</s>]]" in out and "kept 1 samples" in out
    html = page.read_text()
    assert 'class="answer"' in html and 'class="context m"' in html  # trained answer, masked prompt
    assert main(["--data", str(data), "--model", str(pico_dir), "--template", "nope", "--html", str(page)]) == 2


def test_inspect_colours_tool_calls_results_and_reasoning_and_counts_them(pico_dir, tmp_path, capsys):
    import json
    from data.inspect import main
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}
    record = {"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
              "messages": [{"role": "user", "content": "2+?"},
                           {"role": "assistant", "content": None, "reasoning_content": "Use add.", "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "c1", "content": "4"},
                           {"role": "assistant", "content": "It is 4."}]}
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(record) + "\n")
    page = tmp_path / "page.html"
    assert main(["--data", str(data), "--model", str(pico_dir), "--template", "qwen3", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "per part:" in out and "tool_call" in out and "tool_result" in out and "reasoning" in out
    html = page.read_text()
    for cls in ('class="tool_call"', 'class="tool_result m"', 'class="reasoning"', 'class="answer"'):
        assert cls in html, cls
