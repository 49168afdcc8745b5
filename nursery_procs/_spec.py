"""What a parent sends a new child: the bootstrap spec, and target resolution."""

from __future__ import annotations

import importlib
import pickle
import runpy
import sys
import types
from collections.abc import Callable
from typing import Any

import attrs

from ._errors import MainModuleError, WireError

Target = Callable[..., Any] | str | None


def resolve(target: Callable[..., Any] | str) -> Callable[..., Any]:
    """Turn ``"package.module:function"`` into the function; pass callables through."""
    if callable(target):
        return target
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"target {target!r} is not of the form 'module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"target {target!r} is not callable")
    return obj  # type: ignore[no-any-return]


def dump_target(target: Target, args: tuple[Any, ...]) -> bytes:
    """Pickle the target and its arguments now, so that errors show in the parent."""
    if target is not None and not callable(target) and not isinstance(target, str):
        raise TypeError(
            f"target must be a function, a 'module:function' string or None, not {target!r}"
        )
    try:
        return pickle.dumps((target, args), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise WireError(
            f"cannot send target {target!r} to a child: {exc} (it must be importable by "
            "name: a module-level function, not a lambda or a closure)"
        ) from exc


def main_module_spec() -> tuple[str, str] | None:
    """How a child can load the parent's ``__main__``, if it is a script or ``-m`` module.

    Functions defined in a script pickle as ``__main__.name``; as with
    :mod:`multiprocessing`'s spawn method, a child that meets one loads the
    parent's script (its ``if __name__ == "__main__":`` block does not run).
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", ""):
        return ("module", spec.name.removesuffix(".__main__"))
    path = getattr(main, "__file__", None)
    if path and str(path).endswith(".py"):
        return ("path", str(path))
    return None


def load_main_module(how: tuple[str, str]) -> None:
    """In the child: make the parent's ``__main__`` importable as ``__main__`` (once)."""
    if "__mp_main__" in sys.modules:
        return
    kind, where = how
    try:
        if kind == "module":
            namespace = runpy.run_module(where, run_name="__mp_main__", alter_sys=False)
        else:
            namespace = runpy.run_path(where, run_name="__mp_main__")
    except Exception as exc:
        raise MainModuleError(
            f"the child could not import the parent's main module {where!r}: "
            f"{type(exc).__name__}: {exc}. Each child imports it again (as "
            "multiprocessing does) to find the functions it runs, so a script must "
            "not start its work on import: put the entry point under "
            '`if __name__ == "__main__":` (for example `if __name__ == "__main__": '
            "trio.run(main)`)."
        ) from exc
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(namespace)
    sys.modules["__mp_main__"] = sys.modules["__main__"] = module


@attrs.frozen
class Bootstrap:
    """The first message on a child's link."""

    context_id: int
    name: str
    parent_id: int
    parent_name: str
    sys_path: tuple[str, ...]
    target_blob: bytes
    log_level: int
    debug_sleep: float
    max_message_size: int
    siblings_may_talk: bool
    main_module: tuple[str, str] | None = None
    #: ``False``: the child sends only plain data, never pickles.
    trusted: bool = True
    #: Modules shipped ahead of the target, for a child whose runtime was
    #: shipped to it (records of ``nursery_procs._importer``, as plain tuples).
    modules: tuple[tuple[Any, ...], ...] = ()
