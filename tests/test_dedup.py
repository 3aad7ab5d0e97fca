"""Exact and MinHash/LSH near-duplicate detection."""
import json
import random

import numpy as np

from data.dedup import (choose_bands, exact_duplicates, minhash_signatures, near_duplicates,
                        normalize_text, shingles)

BASE = ("Photosynthesis is the process by which green plants use sunlight, water and carbon "
        "dioxide to make glucose and release oxygen into the air around them every day.")
PLANTED = [  # light paraphrases of BASE: a word changed, punctuation, case, a word added
    BASE.replace("green plants", "plants"),
    BASE.upper().replace(",", ""),
    BASE.replace("every day", "each day"),
    BASE + " It happens in the chloroplasts.",
]


def test_exact_duplicates_ignore_case_punctuation_and_spacing():
    texts = ["Hello, world!", "hello world", "Hello  World?", "Goodbye"]
    assert exact_duplicates(texts) == [None, 0, 0, None]
    assert normalize_text("  A,b  C ") == "a b c"


def test_minhash_estimates_jaccard():
    a, b = set(shingles(BASE)), set(shingles(PLANTED[0]))
    true_j = len(a & b) / len(a | b)
    sig = minhash_signatures([BASE, PLANTED[0]], num_perm=256)
    assert abs(np.mean(sig[0] == sig[1]) - true_j) < 0.1


def test_bands_put_the_s_curve_at_the_threshold():
    b, r = choose_bands(0.7, 128)
    assert b * r == 128 and abs((1 / b) ** (1 / r) - 0.7) < 0.05


def test_planted_paraphrases_are_caught_among_unrelated_records(shared_file):
    rows = json.loads(shared_file("data/llamafactory_alpaca_en_demo.json").read_text())
    texts = [r["instruction"] + " " + r["output"] for r in rows[:300]]
    rng = random.Random(0)
    positions = sorted(rng.sample(range(1, 300), len(PLANTED)))
    for pos, p in zip(positions, PLANTED):
        texts.insert(pos, p)
    texts.insert(0, BASE)
    result = near_duplicates(texts, threshold=0.6)
    flagged = {i for i, r in enumerate(result) if r is not None}
    planted_idx = {i for i, t in enumerate(texts) if t in PLANTED}
    assert planted_idx <= flagged
    assert all(result[i][0] == 0 for i in planted_idx)
    assert len(flagged - planted_idx) <= 3  # the demo file itself holds few near-duplicates


def test_scores_choose_which_cluster_member_is_kept():
    texts = [BASE, PLANTED[3], "something else entirely different here"]
    out = near_duplicates(texts, threshold=0.6, scores=[len(t) for t in texts])
    assert out[0] is not None and out[0][0] == 1 and out[1] is None and out[2] is None
