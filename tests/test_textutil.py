"""Hand-written counters: words, sentences, capital words and the language identifier."""
import pytest

from data.textutil import (count_capital_words, count_sentences, count_words, detect_language,
                           split_sentences)


def test_words_are_runs_of_word_characters():
    assert count_words("don't stop-me now, 3.14") == 7  # don t stop me now 3 14
    assert count_words("") == 0


@pytest.mark.parametrize("text,n", [
    ("Hello there. How are you? Fine!", 3),
    ("Dr. Smith met Mr. Jones at 5 p.m. yesterday.", 1),
    ("No end mark at all", 1),
    ("Wait... What happened?", 2),
    ("He paid $3.50 for it. Then he left.", 2),
    ("It was written by J. Presper Eckert. He was clever.", 2),
    ('She said "Stop." Then she left.', 2),
    ("1. apples and pears", 1),
    ("", 0),
])
def test_sentence_counts_follow_punkt_conventions(text, n):
    assert count_sentences(text) == n, split_sentences(text)


def test_closing_quote_stays_with_its_sentence():
    assert split_sentences('He said "Go." Then left.') == ['He said "Go."', "Then left."]


def test_capital_words_split_contractions_and_punctuation():
    assert count_capital_words("I DON'T KNOW, JOHN'S CAR") == 7  # I DO N'T KNOW JOHN 'S CAR
    assert count_capital_words("**BOLD** text A1") == 2
    assert count_capital_words("nothing here") == 0


@pytest.mark.parametrize("lang,text", [
    ("en", "The cat sat on the mat and it was happy with the day."),
    ("de", "Ich glaube, dass das Wetter heute nicht so schön ist wie gestern."),
    ("it", "Penso che il tempo sia molto bello e che non sia necessario uscire."),
    ("pt", "Eu acho que o tempo está muito bonito e não é preciso sair de casa."),
    ("fi", "Minä luulen, että sää on kaunis ja se on hyvä asia kun on kesä."),
    ("sw", "Leo hali ya hewa ni nzuri sana na watu wengi wako katika bustani."),
    ("vi", "Hôm nay thời tiết rất đẹp và chúng tôi đã đi dạo trong công viên."),
    ("ru", "Я думаю, что это очень хорошая идея, и мы уже были в парке."),
    ("bg", "Мисля, че това е много добра идея и ще бъде хубаво да се видим."),
    ("uk", "Я думаю, що це дуже гарна ідея, і ми вже були в парку."),
    ("hi", "मुझे लगता है कि यह एक अच्छा विचार है और हम पार्क में थे।"),
    ("mr", "मला वाटते की हे एक चांगले विचार आहे आणि आम्ही बागेत होतो."),
    ("ne", "मलाई लाग्छ यो राम्रो विचार हो र हामी पार्कमा थियौं। यो पनि ठीक छ।"),
    ("ar", "أعتقد أن هذه فكرة جيدة وكنا في الحديقة مع الأصدقاء."),
    ("fa", "فکر می کنم این یک ایده خوب است و ما در پارک بودیم."),
    ("ur", "میرا خیال ہے کہ یہ ایک اچھا خیال ہے اور ہم پارک میں تھے۔"),
    ("ko", "오늘은 날씨가 정말 좋아서 공원에 갔습니다."),
    ("th", "วันนี้อากาศดีมาก เราจึงไปเดินเล่นที่สวนสาธารณะ"),
    ("ta", "இன்று வானிலை மிகவும் நன்றாக இருந்தது."),
    ("bn", "আজ আবহাওয়া খুব ভালো ছিল।"),
    ("ja", "今日はとても良い天気ですね。"),
])
def test_language_identifier_names_the_languages_ifeval_asks_for(lang, text):
    assert detect_language(text) == lang


def test_language_of_text_without_letters_is_unknown():
    assert detect_language("123 456 !!") is None
