"""k-sparse probing: how well do k SAE latents (vs k raw activation dimensions) predict simple
token properties?

Token-level binary tasks are built offline from the text itself (`TASKS`): for each held-out
position, the token's decoded text (and the previous token's) decides the label. A task needs
at least `min_positives` positive and negative examples in both splits, else it is skipped (and
listed as such).

Procedure, per task and for each k (Gurnee et al. 2023; Gao et al. 2024):

1. Split positions by *sequence* into train / test (seeded), so no context is shared.
2. On the train split rank the latents by `|mean(z | y=1) - mean(z | y=0)|` and keep the top k.
3. Standardise those k features (train mean / std) and fit an L2-regularised logistic regression
   (plain torch, full-batch L-BFGS, float64) with balanced class weights.
4. Report test accuracy, balanced accuracy and F1 of the positive class at threshold 0.5.

The baseline runs the same procedure on the raw activation dimensions instead of latents.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

# label(token_text, previous_token_text or None) -> bool
TaskFn = Callable[[str, "str | None"], bool]


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def capitalized(text: str, prev: str | None) -> bool:
    """The token's first non-space character is an upper-case letter."""
    s = text.lstrip()
    return bool(s) and s[0].isupper()


def punctuation(text: str, prev: str | None) -> bool:
    """The token is punctuation only (ignoring surrounding whitespace)."""
    s = text.strip()
    return bool(s) and all(_is_punct(c) for c in s)


def digit(text: str, prev: str | None) -> bool:
    """The token is digits only (ignoring surrounding whitespace)."""
    s = text.strip()
    return bool(s) and all(c.isdigit() for c in s)


def line_start(text: str, prev: str | None) -> bool:
    """The first non-whitespace token of a line or paragraph (the previous token ends a line)."""
    return bool(text.strip()) and prev is not None and prev.rstrip(" \t").endswith("\n")


def word_start(text: str, prev: str | None) -> bool:
    """A token that starts a word: a leading space followed by a letter."""
    return len(text) > 1 and text[0] == " " and text[1].isalpha()


TASKS: dict[str, TaskFn] = {
    "capitalized": capitalized,
    "punctuation": punctuation,
    "digit": digit,
    "line_start": line_start,
    "word_start": word_start,
}


def token_texts(tokenizer, ids: Iterable[int]) -> dict[int, str]:
    """Decoded text of each token id, leading space included.

    Decoding a single token loses a leading space for SentencePiece-style tokenizers, so each id
    is decoded after a fixed anchor token and the anchor's text is cut off again.
    """
    ids = sorted({int(i) for i in ids})
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    prefix = tokenizer.decode(anchor) if anchor else ""
    out = {}
    for i in ids:
        text = tokenizer.decode(anchor + [i]) if anchor else tokenizer.decode([i])
        out[i] = text[len(prefix):] if text.startswith(prefix) else tokenizer.decode([i])
    return out


def token_labels(input_ids: Tensor, tokenizer, tasks: dict[str, TaskFn] | None = None) -> dict[str, Tensor]:
    """Bool labels `[N, T]` per task for every position of `input_ids` `[N, T]`."""
    tasks = TASKS if tasks is None else tasks
    texts = token_texts(tokenizer, input_ids.unique().tolist())
    rows = [[texts[int(i)] for i in seq] for seq in input_ids.tolist()]
    labels = {}
    for name, fn in tasks.items():
        labels[name] = torch.tensor([[fn(t, seq[j - 1] if j else None) for j, t in enumerate(seq)] for seq in rows],
                                    dtype=torch.bool).reshape(input_ids.shape)
    return labels


def sequence_split(seq: Tensor, test_fraction: float = 0.3, seed: int = 0) -> Tensor:
    """Bool `is_train` per row, splitting whole sequences (seeded permutation of sequence ids)."""
    ids = seq.unique()
    perm = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    n_test = max(1, int(round(len(ids) * test_fraction))) if len(ids) > 1 else 0
    return ~torch.isin(seq, perm[:n_test])


def class_mean_difference(batches: Iterable[Tensor], labels: Tensor, train: Tensor) -> Tensor:
    """`|mean(f | y=1) - mean(f | y=0)|` over train rows, per task and feature: `[n_tasks, width]`.

    `batches` yields feature rows `[b, width]` in row order; `labels` is `[n_tasks, n_rows]` bool.
    """
    pos_sum = all_sum = None
    lo = 0
    for f in batches:
        f = f.double()
        hi = lo + f.shape[0]
        tr = train[lo:hi].to(f.device)
        lab = (labels[:, lo:hi].to(f.device) & tr).double()
        pos = lab @ f
        tot = tr.double() @ f
        pos_sum = pos if pos_sum is None else pos_sum + pos
        all_sum = tot if all_sum is None else all_sum + tot
        lo = hi
    n_pos = (labels & train).sum(1).double().to(pos_sum.device)[:, None]
    n_neg = train.sum().double().to(pos_sum.device) - n_pos
    mean_pos = pos_sum / n_pos.clamp_min(1)
    mean_neg = (all_sum[None] - pos_sum) / n_neg.clamp_min(1)
    return (mean_pos - mean_neg).abs().cpu()


def fit_logistic(x: Tensor, y: Tensor, l2: float = 1e-3, max_iter: int = 200) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Balanced-weight L2 logistic regression on standardised `x` `[n, k]`; returns
    `(weight, bias, mean, std)` so that `logit = ((x - mean) / std) @ weight + bias`."""
    with torch.inference_mode(False), torch.enable_grad():  # also callable from inference mode
        return _fit_logistic(x.double().clone(), y.double().clone(), l2, max_iter)


def _fit_logistic(x: Tensor, y: Tensor, l2: float, max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    xs = (x - mean) / std
    n_pos = y.sum().clamp_min(1)
    n_neg = (len(y) - y.sum()).clamp_min(1)
    weights = torch.where(y > 0, len(y) / (2 * n_pos), len(y) / (2 * n_neg))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y, weight=weights, reduction="sum")
                / weights.sum() + l2 * w.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def classification_scores(pred: Tensor, y: Tensor) -> dict[str, float]:
    pred, y = pred.bool(), y.bool()
    tp = float((pred & y).sum())
    fp = float((pred & ~y).sum())
    fn = float((~pred & y).sum())
    tn = float((~pred & ~y).sum())
    tpr = tp / max(tp + fn, 1)
    tnr = tn / max(tn + fp, 1)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return {"accuracy": (tp + tn) / max(len(y), 1), "balanced_accuracy": (tpr + tnr) / 2, "f1": f1}


def probe(features: Tensor, y: Tensor, train: Tensor, l2: float = 1e-3) -> dict[str, float]:
    """Fit on train rows of `features` `[n, k]`, score on the others."""
    w, b, mean, std = fit_logistic(features[train], y[train], l2=l2)
    test = ~train
    logits = ((features[test].double() - mean) / std) @ w + b
    return classification_scores(logits > 0, y[test])


@dataclass
class ProbeData:
    """What `sparse_probing` needs: labels per row, a split, and two ways to get features."""

    labels: dict[str, Tensor]  # task -> bool [n_rows]
    train: Tensor  # bool [n_rows]
    sae_batches: Callable[[], Iterable[Tensor]]  # yields latents [b, d_sae] in row order
    raw_batches: Callable[[], Iterable[Tensor]]  # yields raw activations [b, d_in] in row order


def _gather(batches: Iterable[Tensor], columns: Tensor) -> Tensor:
    return torch.cat([f[:, columns.to(f.device)].double().cpu() for f in batches])


def sparse_probing(data: ProbeData, ks: Sequence[int] = (1, 5, 20), min_positives: int = 10,
                   l2: float = 1e-3) -> dict:
    """Test scores of k-sparse probes on SAE latents and on raw dimensions, per task and k.

    Returns `{"tasks": {task: {...}}, "skipped": {task: reason}, "mean": {...}}` where
    `mean["sae_f1_k5"]` etc. average over the tasks that ran.
    """
    train = data.train.bool()
    names, skipped = [], {}
    for name, y in data.labels.items():
        y = y.bool()
        counts = [int((y & train).sum()), int((~y & train).sum()), int((y & ~train).sum()), int((~y & ~train).sum())]
        if min(counts) < min_positives:
            skipped[name] = (f"too few examples (train pos/neg {counts[0]}/{counts[1]}, "
                             f"test pos/neg {counts[2]}/{counts[3]}; need {min_positives})")
        else:
            names.append(name)
    result: dict = {"tasks": {}, "skipped": skipped, "ks": list(ks), "mean": {}}
    if not names:
        return result
    labels = torch.stack([data.labels[n].bool() for n in names])
    scores = {"sae": class_mean_difference(data.sae_batches(), labels, train),
              "raw": class_mean_difference(data.raw_batches(), labels, train)}
    k_max = {src: min(max(ks), s.shape[1]) for src, s in scores.items()}
    top = {src: s.topk(k_max[src], dim=1).indices for src, s in scores.items()}  # [n_tasks, k_max]
    columns = {src: t.flatten().unique() for src, t in top.items()}
    gathered = {"sae": _gather(data.sae_batches(), columns["sae"]), "raw": _gather(data.raw_batches(), columns["raw"])}
    test = ~train
    for t, name in enumerate(names):
        y = labels[t]
        entry = {"n_train": int(train.sum()), "n_test": int(test.sum()),
                 "positive_fraction_test": float(y[test].double().mean()),
                 "majority_accuracy": float(max(y[test].double().mean(), 1 - y[test].double().mean()))}
        for src in ("sae", "raw"):
            per_k = {}
            for k in ks:
                chosen = top[src][t, :min(k, k_max[src])]
                idx = torch.searchsorted(columns[src], chosen)
                per_k[str(k)] = {**probe(gathered[src][:, idx], y, train, l2=l2),
                                 "features" if src == "raw" else "latents": chosen.tolist()}
            entry[src] = per_k
        result["tasks"][name] = entry
    for src in ("sae", "raw"):
        for k in ks:
            for metric in ("f1", "accuracy", "balanced_accuracy"):
                vals = [result["tasks"][n][src][str(k)][metric] for n in names]
                result["mean"][f"{src}_{metric}_k{k}"] = sum(vals) / len(vals) if vals else math.nan
    return result
