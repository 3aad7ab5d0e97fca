"""data.packing: packed rows train exactly like the samples one at a time."""
import random

import pytest
import torch
import torch.nn.functional as F

from data.packing import IGNORE_INDEX, PAD_SEQ_ID, best_fit_decreasing, collate, pack, pad_rows, real_fraction
from model.errors import SFTError


def sample(n, start=10, trained_from=0):
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [i if k >= trained_from else IGNORE_INDEX for k, i in enumerate(ids)]}


def test_best_fit_decreasing_fills_rows_tightly_and_never_overflows():
    lengths = [7, 5, 4, 3, 3, 2, 1, 1]
    bins = best_fit_decreasing(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 26 tokens need at least 4 rows of 8
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 128 + 1


def test_packed_rows_restart_positions_and_number_samples_and_mask_first_labels():
    rows = pack([sample(3, 10), sample(4, 20, trained_from=1)], max_seq_len=9, pad_id=0)
    assert len(rows) == 1
    r = rows[0]
    assert r["input_ids"] == [20, 21, 22, 23, 10, 11, 12, 0, 0]
    assert r["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0, 0]
    assert r["seq_ids"] == [0, 0, 0, 0, 1, 1, 1, PAD_SEQ_ID, PAD_SEQ_ID]
    # first token of every sample: -100 (never predicted across a boundary); padding: -100
    assert r["labels"] == [-100, 21, 22, 23, -100, 11, 12, -100, -100]
    assert real_fraction(rows) == 7 / 9


def test_too_long_sample_is_an_error_that_says_to_truncate():
    with pytest.raises(SFTError, match="sample 1 has 9 tokens.*truncate"):
        pack([sample(2), sample(9)], max_seq_len=8)


def test_collate_gives_long_tensors_of_shape_b_t():
    batch = collate(pad_rows([sample(3), sample(5)]) + pack([sample(2)], 5))
    assert set(batch) == {"input_ids", "labels", "position_ids", "seq_ids"}
    for t in batch.values():
        assert t.dtype == torch.long and t.shape == (3, 5)
    assert batch["labels"][0].tolist() == [10, 11, 12, -100, -100]


def per_token_losses(model, batch):
    """CE of each predicted token: logits at t predict labels[t+1]; (B, T-1), 0 where ignored."""
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], seq_ids=batch["seq_ids"]).float()
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return loss, targets != IGNORE_INDEX


def test_packed_loss_equals_unpacked_loss_token_for_token(pico_dir):
    from model import load_pretrained
    from model.loss import masked_ce_sum
    torch.manual_seed(0)
    model = load_pretrained(pico_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    rng = random.Random(0)
    samples = []
    for n in [37, 5, 60, 18, 23, 41, 9, 30]:
        ids = [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]
        start = rng.randrange(1, n)  # a prompt, then a trained answer
        samples.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
    rows = pack(samples, max_seq_len=64)
    assert len(rows) < len(samples)
    with torch.no_grad():
        packed = collate(rows)
        loss, valid = per_token_losses(model, packed)
        # where each sample sits in the packed rows: (row, offset)
        where = {}
        for b, r in enumerate(rows):
            ids = r["input_ids"]
            for s, smp in enumerate(samples):
                n = len(smp["input_ids"])
                for off in range(len(ids) - n + 1):
                    if s not in where and ids[off:off + n] == smp["input_ids"] and r["position_ids"][off] == 0:
                        where[s] = (b, off)
        assert len(where) == len(samples)
        total_alone, n_alone = 0.0, 0
        for s, smp in enumerate(samples):
            alone = collate(pad_rows([smp]))
            l1, v1 = per_token_losses(model, alone)
            b, off = where[s]
            n = len(smp["input_ids"])
            l2, v2 = loss[b, off:off + n - 1], valid[b, off:off + n - 1]
            assert torch.equal(v1[0], v2)
            # fp32 sums in another order (another GEMM shape): a few ulps per matmul -> 1e-5 relative
            assert torch.allclose(l1[0][v1[0]], l2[v2], atol=1e-5, rtol=1e-5)
            total_alone += l1[0][v1[0]].sum().item()
            n_alone += int(v1[0].sum())
        assert int(valid.sum()) == n_alone  # no extra prediction across boundaries or padding
        hidden = model(packed["input_ids"], position_ids=packed["position_ids"], seq_ids=packed["seq_ids"],
                       return_hidden=True)
        loss_sum, n_tok = masked_ce_sum(model, hidden, packed["labels"])
        assert n_tok == n_alone
        assert abs(loss_sum.item() / n_tok - total_alone / n_alone) <= 1e-5
