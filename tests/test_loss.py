"""masked_ce_sum: chunked, masked next-token CE equals the plain full-logits computation."""
import pytest
import torch
import torch.nn.functional as F

from model.llama import Config, Transformer
from model.loss import masked_ce_sum


def tiny_model(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 tie_word_embeddings=tie)
    return Transformer(cfg)


def batch(seed=1, B=3, T=20, V=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[torch.rand(B, T, generator=g) < 0.4] = -100  # prompt / padding positions
    return ids, labels


def reference(model, ids, labels):
    logits = model(ids).float()  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_loss_and_gradients_equal_full_logits_reference(chunk):
    model, (ids, labels) = tiny_model(tie=True), batch()
    ref = reference(model, ids, labels)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, n = masked_ce_sum(model, model(ids, return_hidden=True), labels, chunk_size=chunk)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_label_at_position_t_plus_1_is_predicted_from_position_t():
    model, (ids, _) = tiny_model(), batch(B=1, T=6)
    labels = torch.full_like(ids, -100)
    labels[0, 3] = ids[0, 3]  # only token 3 is trainable: it is predicted from position 2
    loss, n = masked_ce_sum(model, model(ids, return_hidden=True), labels)
    logp = torch.log_softmax(model(ids)[0, 2].float(), -1)
    assert n == 1
    torch.testing.assert_close(loss, -logp[ids[0, 3]], rtol=1e-6, atol=1e-6)


def test_no_trainable_tokens_gives_zero_loss_that_still_backpropagates():
    model, (ids, _) = tiny_model(), batch()
    hidden = model(ids, return_hidden=True)
    loss, n = masked_ce_sum(model, hidden, torch.full_like(ids, -100))
    loss.backward()
    assert n == 0 and loss.item() == 0.0


def test_eval_under_no_grad_matches_training_value():
    model, (ids, labels) = tiny_model(), batch()
    with torch.no_grad():
        a, _ = masked_ce_sum(model, model(ids, return_hidden=True), labels, chunk_size=5)
    b, _ = masked_ce_sum(model, model(ids, return_hidden=True), labels, chunk_size=5)
    torch.testing.assert_close(a, b.detach())
