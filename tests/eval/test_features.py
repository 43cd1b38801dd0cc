"""Feature report: latent choice, top-activating contexts, HTML/JSON output."""

import json

import pytest
import torch

from rsae.eval.features import choose_latents, feature_report, write_feature_report


def test_choose_latents_frequent_then_random_alive():
    fires = torch.tensor([0, 50, 3, 0, 99, 7, 1, 0])
    chosen = choose_latents(fires, None, n_frequent=2, n_random=2, seed=0)
    assert chosen[:2] == [4, 1]
    assert len(chosen) == 4 and set(chosen[2:]) <= {2, 5, 6}  # random among the other alive ones
    assert choose_latents(fires, [7, 0]) == [7, 0]  # explicit, dead ones allowed
    with pytest.raises(ValueError, match="out of range"):
        choose_latents(fires, [8])


def test_feature_report_contexts_and_files(tmp_path):
    input_ids = torch.tensor([[1, 10, 11, 12, 13], [1, 14, 15, 16, 17]])
    texts = {1: "<bos>", 10: "The", 11: " king", 12: " &", 13: " <queen>", 14: "A", 15: " new", 16: "\n", 17: "line"}
    keep = input_ids != 1
    seq, pos = keep.nonzero(as_tuple=True)
    acts = torch.zeros(len(seq), 2)
    acts[2, 0] = 5.0  # latent 7 peaks on " &" (seq 0, pos 3)
    acts[1, 0] = 1.0
    acts[6, 0] = 2.0  # and on "\n" (seq 1, pos 3)
    report = feature_report([7, 9], acts, seq, pos, input_ids, texts, n_examples=5, before=2, after=1)
    first, never = report
    assert first["latent"] == 7 and first["n_fires"] == 3
    assert first["frequency"] == pytest.approx(3 / 8)
    assert [e["act"] for e in first["examples"]] == [5.0, 2.0, 1.0]
    top = first["examples"][0]
    assert top["text"] == "The king & <queen>" and (top["sequence"], top["position"]) == (0, 3)
    assert [t["is_max"] for t in top["tokens"]] == [False, False, True, False]
    assert top["tokens"][1]["act"] == 1.0  # shading uses the latent's activation on context tokens
    assert top["tokens"][1]["intensity"] == pytest.approx(0.2)
    assert never["n_fires"] == 0 and never["examples"] == []
    paths = write_feature_report(report, tmp_path, "report", {"SAE": "x"})
    page = paths["html"].read_text()
    assert "latent-7" in page and "latent-9" in page and "data:image/png;base64," in page
    assert "&amp;" in page and "&lt;queen&gt;" in page  # token text is escaped
    data = json.loads(paths["json"].read_text())
    assert data["latents"][0]["examples"][0]["tokens"][2] == [" &", 5.0]
