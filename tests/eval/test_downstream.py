"""Downstream metrics pinned on tiny random transformers (GPT-2 and Llama configs, no download)."""

import math

import pytest
import torch
import transformers as T

from rsae.data.hooks import resolve_hook
from rsae.eval.downstream import downstream_metrics, loss_recovered, sae_reconstructor
from rsae.sae import ReLUSAE

VOCAB, D, LAYER, HOOK = 96, 16, 1, "resid_post"
BOS = 1


def tiny_model(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=D, n_layer=3, n_head=2, bos_token_id=BOS)
    else:
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=BOS)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # sharper predictions than the tiny init gives, so ablation matters
        model.get_input_embeddings().weight.mul_(8.0)
    return model


def tokens(n=6, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, t), generator=g)
    ids[:, 0] = BOS
    return ids, ids != BOS


def identity_sae(d=D) -> ReLUSAE:
    """relu(x) - relu(-x) = x exactly: W_enc = [I, -I], W_dec = [I; -I]."""
    sae = ReLUSAE(d_in=d, d_sae=2 * d, unit_norm_decoder=False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def zero_sae(d=D) -> ReLUSAE:
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny_model(request.param)


def test_perfect_reconstruction_recovers_everything(model):
    ids, keep = tokens()
    out = downstream_metrics(model, HOOK, LAYER, sae_reconstructor(identity_sae()), ids, keep, batch_size=4)
    assert out["ce_zero"] != pytest.approx(out["ce_clean"], abs=1e-3)  # ablation does something
    assert out["ce_spliced"] == out["ce_clean"]
    assert out["delta_ce"] == 0.0
    assert out["loss_recovered"] == 1.0
    assert out["kl"] == 0.0


def test_zero_reconstruction_equals_zero_ablation(model):
    ids, keep = tokens()
    out = downstream_metrics(model, HOOK, LAYER, sae_reconstructor(zero_sae()), ids, keep, batch_size=4)
    assert out["ce_spliced"] == out["ce_zero"]
    assert out["loss_recovered"] == 0.0
    assert out["kl"] > 0


def test_ce_clean_is_the_models_own_labels_loss(model):
    ids, keep = tokens()
    out = downstream_metrics(model, HOOK, LAYER, lambda a: a, ids, keep, batch_size=5)
    with torch.no_grad():
        hf = float(model(input_ids=ids, labels=ids).loss)
    assert out["ce_clean"] == pytest.approx(hf, rel=1e-6)
    assert out["n_scored"] == ids.shape[0] * (ids.shape[1] - 1)  # every target 1..T-1
    assert out["n_spliced"] == int(keep.sum())


def test_ce_zero_and_kl_by_hand(model):
    """Zero the block output at kept positions only (BOS keeps its clean value), score by hand."""
    ids, keep = tokens(n=3, t=12)
    keep[1, 5] = False  # an extra excluded position: must keep its clean activation
    block = resolve_hook(model, HOOK, LAYER).module

    def zero_kept(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden * (~keep)[..., None].to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        clean = model(input_ids=ids).logits
        handle = block.register_forward_hook(zero_kept)
        try:
            ablated = model(input_ids=ids).logits
        finally:
            handle.remove()
    nll = []
    for n in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            nll.append(-torch.log_softmax(ablated[n, t].double(), -1)[ids[n, t + 1]])
    ce_zero = float(torch.stack(nll).mean())
    noise = 0.5 * torch.randn(D, generator=torch.Generator().manual_seed(1))
    out = downstream_metrics(model, HOOK, LAYER, lambda a: a + noise.to(a.dtype), ids, keep, batch_size=2)
    assert out["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    # KL(p_clean || p_spliced) by hand, with the same splice.
    with torch.no_grad():
        handle = block.register_forward_hook(
            lambda m, a, o: ((o[0] + noise * keep[..., None]), *o[1:]) if isinstance(o, tuple) else o + noise * keep[..., None])
        try:
            spliced = model(input_ids=ids).logits
        finally:
            handle.remove()
    p = torch.log_softmax(clean[:, :-1].double(), -1)
    q = torch.log_softmax(spliced[:, :-1].double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert out["kl"] == pytest.approx(kl, rel=1e-4)
    ce_spliced = float(torch.nn.functional.cross_entropy(spliced[:, :-1].reshape(-1, VOCAB).double(), ids[:, 1:].reshape(-1)))
    assert out["ce_spliced"] == pytest.approx(ce_spliced, rel=1e-5)
    expected = (out["ce_zero"] - out["ce_spliced"]) / (out["ce_zero"] - out["ce_clean"])
    assert out["loss_recovered"] == pytest.approx(expected)


def test_padding_targets_are_not_scored(model):
    ids, keep = tokens(n=4, t=16)
    am = torch.ones_like(ids)
    am[1, 10:] = 0  # right padding
    am[3, 4:] = 0
    ids = ids.masked_fill(am == 0, 0)
    keep = keep & am.bool()
    out = downstream_metrics(model, HOOK, LAYER, lambda a: a, ids, keep, batch_size=3, attention_mask=am)
    labels = ids.masked_fill(am == 0, -100)
    with torch.no_grad():
        hf = float(model(input_ids=ids, attention_mask=am, labels=labels).loss)
    assert out["ce_clean"] == pytest.approx(hf, rel=1e-5)
    assert out["n_scored"] == int(am[:, 1:].sum())


def test_batch_size_does_not_change_results(model):
    ids, keep = tokens(n=7)
    fn = sae_reconstructor(zero_sae())
    a = downstream_metrics(model, HOOK, LAYER, fn, ids, keep, batch_size=7)
    b = downstream_metrics(model, HOOK, LAYER, fn, ids, keep, batch_size=2)
    for k in ("ce_clean", "ce_spliced", "ce_zero", "kl"):
        assert a[k] == pytest.approx(b[k], rel=1e-5)


def test_scale_is_folded_like_the_training_module():
    """sae(x * s) / s: an identity SAE stays an identity for any scale."""
    fn = sae_reconstructor(identity_sae(4), scale=torch.tensor(3.0))
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(fn(x), x)


def test_loss_recovered_without_an_effect_is_nan():
    assert math.isnan(loss_recovered(2.0, 2.5, 2.0))


def test_bad_shapes_are_rejected():
    model = tiny_model("gpt2")
    ids, keep = tokens()
    with pytest.raises(ValueError, match="keep_mask"):
        downstream_metrics(model, HOOK, LAYER, lambda a: a, ids, keep[:, :-1])
