"""Triton kernels written as plain functions, compiled on first use.

Kernel modules define their kernels and helpers as undecorated functions, so that importing them
costs nothing and works without Triton; `jit_functions` turns them into Triton functions that call
each other's compiled versions."""

from __future__ import annotations

import types


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def jit_functions(namespace: dict, names: tuple[str, ...]) -> dict:
    """{name: triton.jit(function)} for the functions `names` of a module's namespace (`globals()`).
    Each is rebuilt over a copy of that namespace in which the others are already decorated, so a
    kernel resolves its helpers to their Triton versions."""
    import triton

    glob = dict(namespace)
    for name in names:
        fn = namespace[name]
        new = types.FunctionType(fn.__code__, glob, fn.__name__, fn.__defaults__, fn.__closure__)
        new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
        new.__annotations__ = dict(fn.__annotations__)
        glob[name] = triton.jit(new)
    return {name: glob[name] for name in names}
