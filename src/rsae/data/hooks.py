"""Named hook points in Hugging Face causal LMs: read an activation, stop early, or replace it.

Hook names (at a `layer`, 0-based):

* `resid_pre`:  residual stream entering block `layer` (forward pre-hook on the block).
* `resid_post`: residual stream leaving block `layer` (the block's output).
* `attn_out`:   what the attention sub-block adds to the residual stream.
* `mlp_out`:    what the MLP sub-block adds to the residual stream.

Blocks are found at `transformer.h` (GPT-2, GPT-J, Bloom), `gpt_neox.layers` (Pythia),
`model.layers` (Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM), `model.decoder.layers` (OPT) or
`transformer.blocks` (MPT). Models that normalise a sub-block's output before adding it (Gemma-2/3,
OLMo-2: `post_feedforward_layernorm`) hook that norm, as TransformerLens does. Any other module is
reachable by its dotted path as the hook name (`transformer.h.3.mlp`), which hooks its output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

HOOK_NAMES = ("resid_pre", "resid_post", "attn_out", "mlp_out")

_BLOCK_LISTS = ("transformer.h", "gpt_neox.layers", "model.layers", "model.decoder.layers", "transformer.blocks",
                "model.language_model.layers", "language_model.model.layers")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook: the module, its dotted path, and whether we hook its input (`pre`)."""

    module: nn.Module
    path: str
    pre: bool = False


def hook_points(hook, layer) -> list[tuple[str, int | None]]:
    """`(hook, layer)` pairs named by a hook and a layer, each a single value or a list: every
    hook with every layer, hooks outer (`[resid_post, mlp_out]` x `[4, 8]` gives four). A module
    path ignores its layer; give it with one."""
    def as_list(value) -> list:
        if isinstance(value, (str, int)) or value is None:
            return [value]
        return list(value)

    hooks, layers = as_list(hook), as_list(layer)
    if not hooks or not layers:
        raise ValueError(f"no hook point: hook={hook!r}, layer={layer!r}")
    points = [(str(h), None if l is None else int(l)) for h in hooks for l in layers]
    return list(dict.fromkeys(points))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of transformer blocks and its dotted path."""
    for path in _BLOCK_LISTS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return path, blocks
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__} (looked for {', '.join(_BLOCK_LISTS)}); "
        "give the hook as a module path instead, e.g. hook=transformer.h.3.mlp"
    )


def _child(block: nn.Module, names: tuple[str, ...], what: str, block_path: str) -> str:
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    raise ValueError(f"block {block_path} has no {what} sub-module (looked for {', '.join(names)})")


def resolve_hook(model: nn.Module, hook: str, layer: int | None = None) -> HookPoint:
    """Resolve `hook` (a name in HOOK_NAMES at `layer`, or a dotted module path) to a HookPoint."""
    if hook not in HOOK_NAMES:
        try:
            return HookPoint(model.get_submodule(hook), hook)
        except AttributeError:
            raise ValueError(f"unknown hook {hook!r}: expected one of {HOOK_NAMES} or a module path of the model") from None
    blocks_path, blocks = find_blocks(model)
    if layer is None or not -len(blocks) <= int(layer) < len(blocks):
        raise ValueError(f"layer {layer} out of range: {type(model).__name__} has {len(blocks)} blocks")
    layer = int(layer) % len(blocks)
    block_path = f"{blocks_path}.{layer}"
    block = blocks[layer]
    if hook == "resid_pre":
        return HookPoint(block, block_path, pre=True)
    if hook == "resid_post":
        return HookPoint(block, block_path)
    post_norm = "post_feedforward_layernorm"  # Gemma-2/3, OLMo-2: sub-block outputs are normalised
    if hook == "mlp_out":
        name = post_norm if hasattr(block, post_norm) else _child(block, _MLP_NAMES, "MLP", block_path)
    else:
        name = "post_attention_layernorm" if hasattr(block, post_norm) else _child(block, _ATTN_NAMES, "attention", block_path)
    return HookPoint(block.get_submodule(name), f"{block_path}.{name}")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, value: torch.Tensor):
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


def _pre_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _attach(point: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register `fn(activation) -> replacement or None` on the hook point; returns the handle."""
    if point.pre:
        def pre_hook(module, args, kwargs):
            new = fn(_pre_input(args, kwargs))
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        new = fn(_first(output))
        return None if new is None else _replace_first(output, new)

    return point.module.register_forward_hook(hook)


class _StopForward(Exception):
    """Raised from a hook to abandon the rest of the forward pass once we have what we need."""


class Capture:
    """Holds the activation captured by `capture`; `.value` is `[batch, seq, d]`."""

    value: torch.Tensor | None = None


@contextlib.contextmanager
def capture(model: nn.Module, hook: str, layer: int | None = None, stop: bool = True) -> Iterator[Capture]:
    """Record the activation at a hook point during a forward pass run inside the block.

    With `stop=True` the forward pass is abandoned right after the hook fires (the layers above
    and the unembedding are never computed): the model call is cut short and the block exits.

        with capture(model, "resid_post", 6) as cap:
            model(input_ids)
        acts = cap.value
    """
    point = resolve_hook(model, hook, layer)
    holder = Capture()

    def record(activation: torch.Tensor) -> None:
        holder.value = activation.detach()
        if stop:
            raise _StopForward

    handle = _attach(point, record)
    try:
        yield holder
    except _StopForward:
        pass
    finally:
        handle.remove()
    if holder.value is None:
        raise RuntimeError(f"hook {hook!r} at layer {layer} ({point.path}) never fired during the forward pass")


def run_to_hook(model: nn.Module, hook: str, layer: int | None, **inputs) -> torch.Tensor:
    """Forward `inputs` until the hook point and return its activation `[batch, seq, d]`."""
    with capture(model, hook, layer) as cap:
        model(**inputs, use_cache=False)
    return cap.value


@contextlib.contextmanager
def capture_many(model: nn.Module, points: Sequence[tuple[str, int | None]], stop: bool = True) -> Iterator[list[Capture]]:
    """`capture` for several `(hook, layer)` points in one forward pass: one Capture each, in the
    order given. With `stop=True` the pass is abandoned once the last of them (the deepest) has
    fired. Each point keeps its first activation, cloned unless the pass stops right after it
    (the rest of the pass runs after it)."""
    resolved = [resolve_hook(model, hook, layer) for hook, layer in points]
    holders = [Capture() for _ in points]
    waiting = set(range(len(points)))

    def recorder(i: int) -> Callable[[torch.Tensor], None]:
        def record(activation: torch.Tensor) -> None:
            if i not in waiting:
                return
            waiting.discard(i)
            last = stop and not waiting  # nothing runs after it
            holders[i].value = activation.detach() if last else activation.detach().clone()
            if stop and not waiting:
                raise _StopForward

        return record

    handles = [_attach(point, recorder(i)) for i, point in enumerate(resolved)]
    try:
        yield holders
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if waiting:
        names = ", ".join(f"{points[i][0]!r} at layer {points[i][1]} ({resolved[i].path})" for i in sorted(waiting))
        raise RuntimeError(f"hook {names} never fired during the forward pass")


def run_to_hooks(model: nn.Module, points: Sequence[tuple[str, int | None]], **inputs) -> list[torch.Tensor]:
    """Forward `inputs` until the deepest of `points` and return each point's activation."""
    with capture_many(model, points) as caps:
        model(**inputs, use_cache=False)
    return [cap.value for cap in caps]


@contextlib.contextmanager
def splice(model: nn.Module, hook: str, layer: int | None, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Replace the activation at a hook point by `fn(activation)` for forward passes in the block.

    `fn` gets the `[batch, seq, d]` activation and must return a tensor of the same shape (e.g. an
    SAE reconstruction, zeros for ablation, or a masked mix of both).
    """
    point = resolve_hook(model, hook, layer)

    def replace(activation: torch.Tensor) -> torch.Tensor:
        new = fn(activation)
        if new.shape != activation.shape:
            raise ValueError(f"splice function returned shape {tuple(new.shape)}, expected {tuple(activation.shape)}")
        return new.to(activation.dtype)

    handle = _attach(point, replace)
    try:
        yield point
    finally:
        handle.remove()
