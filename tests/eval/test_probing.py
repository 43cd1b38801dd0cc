"""k-sparse probing: task labels from text, latent selection by mean difference, probe scores."""

import pytest
import torch

from rsae.data.tiny import train_tokenizer
from rsae.eval.probing import (
    TASKS,
    ProbeData,
    class_mean_difference,
    classification_scores,
    sequence_split,
    sparse_probing,
    token_labels,
    token_texts,
)


@pytest.mark.parametrize(
    "task,text,prev,expected",
    [
        ("capitalized", " The", None, True), ("capitalized", "the", None, False), ("capitalized", "3", None, False),
        ("punctuation", ".", None, True), ("punctuation", " ,", None, True), ("punctuation", "a.", None, False),
        ("digit", " 42", None, True), ("digit", "4a", None, False),
        ("line_start", "The", ".\n", True), ("line_start", "The", "\n\n", True), ("line_start", "The", " ", False),
        ("line_start", "\n", "\n", False), ("line_start", "The", None, False),
        ("word_start", " king", None, True), ("word_start", "king", None, False), ("word_start", " 4", None, False),
    ],
)
def test_task_definitions(task, text, prev, expected):
    assert TASKS[task](text, prev) is expected


@pytest.fixture(scope="module")
def tokenizer():
    text = "\n\n".join(f"The king had {i} swords, and the Queen {2 * i} crowns.\nA new line. Then more!" for i in range(60))
    return train_tokenizer(text, vocab_size=400)


def test_token_texts_keep_leading_spaces(tokenizer):
    ids = tokenizer.encode("The king had 12 swords.\nA new", add_special_tokens=False)
    texts = token_texts(tokenizer, ids)
    assert "".join(texts[i] for i in ids) == "The king had 12 swords.\nA new"


def test_token_labels_mark_the_right_positions(tokenizer):
    text = "The king had 12 swords.\nA new line"
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    labels = token_labels(ids, tokenizer)
    pieces = [token_texts(tokenizer, ids[0].tolist())[int(i)] for i in ids[0]]
    caps = [p for p, y in zip(pieces, labels["capitalized"][0]) if y]
    assert caps and all(p.lstrip()[0].isupper() for p in caps)
    starts = [p for p, y in zip(pieces, labels["line_start"][0]) if y]
    assert starts and starts[0].startswith("A")
    assert any(labels["digit"][0]) and any(labels["punctuation"][0])


def test_sequence_split_keeps_sequences_whole():
    seq = torch.arange(20).repeat_interleave(5)
    train = sequence_split(seq, test_fraction=0.3, seed=0)
    for s in range(20):
        assert train[seq == s].all() or (~train[seq == s]).all()
    assert int((~train).sum()) == 6 * 5


def test_class_mean_difference_matches_direct_computation():
    torch.manual_seed(0)
    f = torch.randn(50, 7)
    labels = torch.rand(2, 50) > 0.5
    train = torch.rand(50) > 0.3
    got = class_mean_difference((f[i:i + 8] for i in range(0, 50, 8)), labels, train)
    for t in range(2):
        pos, neg = labels[t] & train, ~labels[t] & train
        expected = (f[pos].mean(0) - f[neg].mean(0)).abs()
        torch.testing.assert_close(got[t].float(), expected, rtol=1e-5, atol=1e-6)


def test_scores():
    pred = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    y = torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool)
    s = classification_scores(pred, y)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_probe_finds_the_informative_latent_and_beats_raw_dims():
    """Latent 3 fires exactly on positives; the raw activations hide the label in a rotation."""
    g = torch.Generator().manual_seed(0)
    n, d, m = 3000, 8, 32
    y = torch.rand(n, generator=g) < 0.2
    z = torch.relu(torch.randn(n, m, generator=g)) * 0.3
    z[:, 3] = y.float() * (1 + torch.rand(n, generator=g))
    rot = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    x = torch.randn(n, d, generator=g)
    x[:, 0] = 0.3 * y.float() + torch.randn(n, generator=g)  # weak signal in raw space
    x = x @ rot
    seq = torch.arange(n) // 10
    data = ProbeData(labels={"task": y, "never": torch.zeros(n, dtype=torch.bool)},
                     train=sequence_split(seq, 0.3, 0),
                     sae_batches=lambda: (z[i:i + 512] for i in range(0, n, 512)),
                     raw_batches=lambda: (x[i:i + 512] for i in range(0, n, 512)))
    out = sparse_probing(data, ks=(1, 5))
    assert "never" in out["skipped"] and "never" not in out["tasks"]
    task = out["tasks"]["task"]
    assert task["sae"]["1"]["latents"] == [3]
    assert task["sae"]["1"]["f1"] > 0.99 and task["sae"]["1"]["accuracy"] > 0.99
    assert task["raw"]["1"]["f1"] < task["sae"]["1"]["f1"]
    assert len(task["raw"]["5"]["features"]) == 5
    assert out["mean"]["sae_f1_k1"] == task["sae"]["1"]["f1"]
