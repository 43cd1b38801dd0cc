"""Hook points on tiny random GPT-2 / GPT-NeoX / Llama / Gemma-2 models: capture, early stop, splice."""

import pytest
import torch

from rsae.data.hooks import capture, find_blocks, resolve_hook, run_to_hook, splice
from rsae.data.tiny import FAMILIES, tiny_config, train_tokenizer, sample_text

N_LAYERS = 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(sample_text(50), vocab_size=300)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(request.param, len(tokenizer), tokenizer, n_layers=N_LAYERS, d_model=32)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _reference(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True, use_cache=False)


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_resid_pre_matches_hidden_states(model, ids, layer):
    ref = _reference(model, ids).hidden_states[layer]  # hidden_states[0] is the embedding output
    with torch.no_grad():
        torch.testing.assert_close(run_to_hook(model, "resid_pre", layer, input_ids=ids), ref)


@pytest.mark.parametrize("layer", range(N_LAYERS - 1))  # the last entry has the final norm applied
def test_resid_post_matches_hidden_states(model, ids, layer):
    ref = _reference(model, ids).hidden_states[layer + 1]
    with torch.no_grad():
        torch.testing.assert_close(run_to_hook(model, "resid_post", layer, input_ids=ids), ref)


@pytest.mark.parametrize("hook", ["mlp_out", "attn_out"])
def test_sublayer_hooks_capture_the_submodule_output(model, ids, hook):
    point = resolve_hook(model, hook, 1)
    seen = []
    handle = point.module.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(run_to_hook(model, hook, 1, input_ids=ids), seen[0])
    assert seen[0].shape == (*ids.shape, model.config.hidden_size)


def test_gemma2_hooks_post_norms(tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("gemma2", len(tokenizer), tokenizer, n_layers=2))
    assert resolve_hook(model, "mlp_out", 1).path == "model.layers.1.post_feedforward_layernorm"
    assert resolve_hook(model, "attn_out", 0).path == "model.layers.0.post_attention_layernorm"


def test_forward_stops_after_the_hooked_layer(model, ids):
    _, blocks = find_blocks(model)
    calls, out = [], "not assigned"
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad(), capture(model, "resid_post", 0) as cap:
            out = model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]
    assert out == "not assigned"  # the model call was abandoned
    assert cap.value.shape[:2] == ids.shape


def test_capture_without_stop_runs_the_whole_model(model, ids):
    with torch.no_grad(), capture(model, "resid_pre", 1, stop=False) as cap:
        out = model(ids, use_cache=False)
    assert out.logits.shape[:2] == ids.shape and cap.value is not None


def test_explicit_module_path(model, ids):
    blocks_path, _ = find_blocks(model)
    with torch.no_grad():
        by_path = run_to_hook(model, f"{blocks_path}.1", None, input_ids=ids)
        by_name = run_to_hook(model, "resid_post", 1, input_ids=ids)
    torch.testing.assert_close(by_path, by_name)


@pytest.mark.parametrize("hook", ["resid_pre", "resid_post", "mlp_out", "attn_out"])
def test_identity_splice_keeps_logits_and_zero_splice_changes_them(model, ids, hook):
    with torch.no_grad():
        clean = model(ids, use_cache=False).logits
        with splice(model, hook, 1, lambda x: x.clone()):
            same = model(ids, use_cache=False).logits
        with splice(model, hook, 1, torch.zeros_like):
            ablated = model(ids, use_cache=False).logits
        after = model(ids, use_cache=False).logits
    torch.testing.assert_close(same, clean)
    assert not torch.allclose(ablated, clean)
    torch.testing.assert_close(after, clean)  # the hook is removed on exit


def test_splice_rejects_a_wrong_shape(model, ids):
    with pytest.raises(ValueError, match="shape"), torch.no_grad():
        with splice(model, "resid_post", 0, lambda x: x[..., :3]):
            model(ids, use_cache=False)


def test_bad_hooks_are_one_line_errors(model):
    with pytest.raises(ValueError, match="unknown hook"):
        resolve_hook(model, "resid_middle", 0)
    with pytest.raises(ValueError, match="out of range"):
        resolve_hook(model, "resid_post", N_LAYERS)
    with pytest.raises(ValueError, match="cannot find the transformer blocks"):
        resolve_hook(torch.nn.Linear(2, 2), "resid_post", 0)
