"""One registry of what wraps a module's forward: named, ordered, removable hooks that own what they change.

Why: paging, fp32 compute over bf16 storage, oneDNN-packed weights and the one-row kernel all wrap the same
Linears. Each used to find the others through instance attributes and the order of the calls that installed
them. Here every wrapper is a `ModuleHook` registered under a name in the module's `HookRegistry` (after
diffusers' `hooks/hooks.py`): the registry composes them in a fixed order (`ModuleHook.order`, outermost
first, then by name), so the result does not depend on who registered first; `remove(name)` lets a hook undo
what it changed (`detach`), and when the last hook goes the module's own forward is back.

Lowest layer (offload imports nothing of ours), so `quant/` and `lite/` can register hooks too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from torch import nn

#: Where a hook sits in the chain (lower = outer): paging must put the weights in place before anything reads
#: them; a compute cast wraps the kernel that runs in the stored dtype; a kernel replaces the forward itself.
PAGING, COMPUTE, ROUTING, KERNEL = 0, 10, 20, 30

_ATTRIBUTE = "_lite_hook_registry"


class ModuleHook:
    """A wrapper of one module's forward. Override `attach`/`detach` for state the hook changes on the module,
    `pre_forward`/`post_forward` to see the call, or `forward` to replace it (call `inner` to go on)."""

    order: int = COMPUTE
    #: True when `attach` replaces the module's tensors with a layout that paging cannot copy (oneDNN's blocked
    #: weights): paging takes such hooks off the modules it pages and puts them back when it is removed.
    changes_tensors: bool = False

    def attach(self, module: nn.Module) -> None:
        """Change the module's state (called once, on registration)."""

    def detach(self, module: nn.Module) -> None:
        """Undo `attach` exactly (called once, on removal)."""

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output

    def forward(self, module: nn.Module, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self.pre_forward(module, args, kwargs)
        return self.post_forward(module, inner(*args, **kwargs))


class HookRegistry:
    """The hooks of one module, by name; `HookRegistry.of(module)` finds or creates it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._hooks: dict[str, ModuleHook] = {}
        base = module.forward  # the class's forward, or an override someone else set: the end of the chain
        own = getattr(base, "__func__", None) is type(module).forward and getattr(base, "__self__", None) is module
        self._base: Callable[..., Any] = base
        self._restore_base = not own  # an override that was there before us goes back when the last hook goes

    @classmethod
    def of(cls, module: nn.Module, create: bool = True) -> "HookRegistry | None":
        registry = getattr(module, _ATTRIBUTE, None)
        if registry is None and create:
            registry = cls(module)
            object.__setattr__(module, _ATTRIBUTE, registry)  # not a submodule or parameter: a plain attribute
        return registry

    def names(self) -> list[str]:
        """The hooks' names from the outermost to the innermost."""
        return [name for name, _ in sorted(self._hooks.items(), key=lambda kv: (kv[1].order, kv[0]))]

    def get(self, name: str) -> ModuleHook | None:
        return self._hooks.get(name)

    def register(self, name: str, hook: ModuleHook) -> ModuleHook:
        if name in self._hooks:
            raise ValueError(f"{type(self.module).__name__} already has a hook named {name!r}")
        try:
            hook.attach(self.module)
        except BaseException:
            if not self._hooks:  # nothing hooked: the module keeps no empty registry
                object.__delattr__(self.module, _ATTRIBUTE)
            raise
        self._hooks[name] = hook
        self._rewire()
        return hook

    def remove(self, name: str) -> ModuleHook | None:
        """Take the hook off (it undoes its state); None when there is none of that name."""
        hook = self._hooks.pop(name, None)
        if hook is None:
            return None
        try:
            hook.detach(self.module)
        finally:
            self._rewire()
        return hook

    def _rewire(self) -> None:
        module = self.module
        if not self._hooks:
            delattr(module, "forward")  # the instance attribute the chain was; the class's forward shows again
            if self._restore_base:
                module.forward = self._base  # type: ignore[method-assign]
            object.__delattr__(module, _ATTRIBUTE)
            return
        call = self._base
        for name in reversed(self.names()):
            call = functools.partial(self._hooks[name].forward, module, call)
        module.forward = functools.update_wrapper(call, self._base)  # type: ignore[method-assign]


def add_hook(module: nn.Module, name: str, hook: ModuleHook) -> ModuleHook:
    """Register `hook` on `module` under `name` (refused when the name is taken)."""
    registry = HookRegistry.of(module)
    assert registry is not None
    return registry.register(name, hook)


def get_hook(module: nn.Module, name: str) -> ModuleHook | None:
    registry = HookRegistry.of(module, create=False)
    return None if registry is None else registry.get(name)


def hook_names(module: nn.Module) -> list[str]:
    registry = HookRegistry.of(module, create=False)
    return [] if registry is None else registry.names()


def remove_hook(module: nn.Module, name: str) -> ModuleHook | None:
    registry = HookRegistry.of(module, create=False)
    return None if registry is None else registry.remove(name)


def hooked_modules(root: nn.Module, name: str) -> Iterator[tuple[nn.Module, ModuleHook]]:
    """(module, hook) for every module under `root` that has a hook named `name`."""
    for module in root.modules():
        hook = get_hook(module, name)
        if hook is not None:
            yield module, hook


def remove_hooks(root: nn.Module, name: str | None = None) -> int:
    """Remove the hooks named `name` (every hook when None) under `root`; returns how many went."""
    removed = 0
    for module in list(root.modules()):
        for hook_name in (hook_names(module) if name is None else [name]):
            removed += remove_hook(module, hook_name) is not None
    return removed


def forward_is_overridden(module: nn.Module) -> bool:
    """Whether someone outside this registry replaced `module.forward` (such a module is left alone)."""
    registry = HookRegistry.of(module, create=False)
    if registry is not None:
        return registry._restore_base
    forward = module.forward
    return not (getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module)


__all__ = ["COMPUTE", "KERNEL", "PAGING", "ROUTING", "HookRegistry", "ModuleHook", "add_hook",
           "forward_is_overridden", "get_hook", "hook_names", "hooked_modules", "remove_hook", "remove_hooks"]


@dataclass
class HookedLayers:
    """The layers one call hooked under `name`, so `remove()` takes exactly those hooks off (and no other's)."""

    name: str
    layers: list[nn.Module] = field(default_factory=list)

    def remove(self) -> None:
        for layer in self.layers:
            remove_hook(layer, self.name)
        self.layers.clear()

