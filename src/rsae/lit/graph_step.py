"""A training step captured once as a CUDA graph and then replayed: one launch per step.

A small SAE's step is host-bound on a fast GPU: Lightning's loop, the Python of the forward,
the autograd engine and the optimizer take longer to launch the kernels than the GPU takes to run
them. Replaying the captured step (forward, backward, gradient clipping) costs the host one
launch, whatever the number of kernels inside.

`CapturedStep(fn, x, key)` runs `fn(x)` eagerly until the same `key` has been seen `warmup`
times in a row (the first call compiles, lazily built state settles), then captures it and from
then on copies `x` into the captured input and replays. A new key (another batch shape, a
changed SAE setting, TopK's AuxK switching on) runs eagerly again and is captured in its turn;
the `max_graphs` most recently used graphs are kept (each holds its own memory). What a graph
reads must stay where it was at capture time: parameters and buffers are updated in place, and
`fn` must not branch on device values on the host (it cannot: capture forbids host
synchronisation). Off CUDA every call is eager.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    input: Tensor
    output: Any


class CapturedStep:
    def __init__(self, warmup: int = 2, max_graphs: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (a step runs eagerly before it is captured), got {warmup}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.warmup, self.max_graphs = warmup, max_graphs
        self.graphs: OrderedDict[Any, _Graph] = OrderedDict()  # by key, least recently used first
        self.captures = 0  # how many graphs were captured (a test and the benchmark read it)
        self._candidate: Any = None  # the key of the latest eager steps, and how many in a row
        self._seen = 0
        self._previous: Any = None  # the key before the candidate (what changed, for the warnings)
        self._eager_run = 0  # eager steps since the last replay or capture
        self.still_eager = 50
        self._stream: torch.cuda.Stream | None = None
        self._warned: set[str] = set()

    def __call__(self, fn: Callable[[Tensor], Any], x: Tensor, key: Any) -> Any:
        if not x.is_cuda:
            return fn(x)
        key = (tuple(x.shape), x.dtype, x.device, key)
        captured = self.graphs.get(key)
        if captured is not None:
            self.graphs.move_to_end(key)
            self._eager_run = 0
            captured.input.copy_(x, non_blocking=True)
            captured.graph.replay()
            return captured.output
        if self._ready_to_capture(key):
            return self._capture(fn, x, key)
        return self._on_side_stream(fn, x)

    def _ready_to_capture(self, key: Any) -> bool:
        """Counts the eager steps of a key without a graph: True once it has come `warmup` times
        in a row. Warns once when a captured step changes, and once when the step keeps changing
        (`still_eager` eager steps in a row, e.g. a callback adjusting a coefficient every step)."""
        if key != self._candidate:
            if self.graphs and "changed" not in self._warned:
                self._warned.add("changed")
                log.warning("module.cuda_graph: the step changed after its capture (%s); it runs eagerly until it "
                            "holds still for %d steps, then is captured again", _difference(next(reversed(self.graphs)), key),
                            self.warmup)
            self._previous = self._candidate
            self._candidate, self._seen = key, 0
        self._seen += 1
        self._eager_run += 1
        if self._eager_run >= self.still_eager and "never" not in self._warned:
            self._warned.add("never")
            log.warning("module.cuda_graph: the step has not held still for %d steps in a row over the last %d (%s); "
                        "it runs uncaptured while that lasts", self.warmup + 1, self._eager_run,
                        _difference(self._previous, key))
        return self._seen > self.warmup

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None or self._stream.device != torch.cuda.current_device():
            self._stream = torch.cuda.Stream()
        return self._stream

    def _on_side_stream(self, fn, x: Tensor):
        # Eager steps run on the stream the capture will use, so that what is created lazily per
        # stream (cuBLAS workspaces, compiled kernels' first launches) exists before capture.
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), _autocast_without_cache():  # as in the capture: a compiled step
            out = fn(x)  # guards on autocast's cache setting, and a recompile inside a capture fails
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, fn, x: Tensor, key):
        while len(self.graphs) >= self.max_graphs:  # free the least recently used graph's memory first
            self.graphs.popitem(last=False)
        static_input = x.detach().clone()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's thread keeps copying batches while this one captures.
        try:
            with torch.cuda.graph(graph, stream=self._side_stream(), capture_error_mode="thread_local"):
                # Autocast's cast cache would let a cast made before capture stand in for one made
                # on replay; inside the graph every cast is recomputed.
                with _autocast_without_cache(), torch._dynamo.config.patch(error_on_recompile=True):
                    output = fn(static_input)
        except torch._dynamo.exc.RecompileError as err:
            raise RuntimeError(f"module.cuda_graph: the compiled step recompiled while it was being captured "
                               f"(something it depends on changed after its warm-up): {err}") from err
        self.graphs[key] = _Graph(graph, static_input, output)
        self.captures += 1
        self._eager_run = 0
        graph.replay()  # the capture ran nothing: this is the step's computation
        return output


def _autocast_without_cache():
    device = "cuda"
    return torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device),
                          cache_enabled=False)


def _difference(old, new) -> str:
    """What differs between two step keys, for the warning (keys are nested tuples; a setting is
    a (name, value) pair)."""
    if (isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new) == 2
            and isinstance(old[0], str) and old[0] == new[0]):
        return f"{old[0]}: {old[1]!r} -> {new[1]!r}"
    if isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new):
        parts = [_difference(a, b) for a, b in zip(old, new) if a != b]
        return "; ".join(p for p in parts if p)
    return f"{old!r} -> {new!r}"
