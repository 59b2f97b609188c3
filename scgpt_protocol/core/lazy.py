"""Lazy re-exports for package ``__init__`` files (PEP 562), so that importing one light module of a
package (``scgpt_protocol.core.errors``) does not import its heavy neighbours (torch, scanpy, matplotlib)."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, exports: dict[str, str], *, submodules: Sequence[str] = (),
                 moved: Mapping[str, str] | None = None,
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for a package whose public names live in its modules.

    ``exports`` maps each public name to the module (relative to ``package``) that defines it;
    ``submodules`` are imported on first access as attributes (``scgpt_protocol.pp``). ``moved`` maps an old
    public name of this package to where it is now imported from: an absolute module
    (``scgpt_protocol.protocol.display``), or ``module:new_name`` when it was renamed too. The old name still
    works, with a ``DeprecationWarning`` that names the new home (it is not in ``__all__``).
    """
    moved = dict(moved or {})

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f".{name}", package)
        if name in moved and name not in exports:
            module, _, new = moved[name].partition(":")
            where = f"{new} from {module}" if new else f"it from {module}"
            warnings.warn(f"{package}.{name} has moved: import {where} (the old name goes in a later release)",
                          DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(module), new or name)
        module = exports.get(name)
        if module is None:
            msg = f"module {package!r} has no attribute {name!r}"
            raise AttributeError(msg)
        return getattr(importlib.import_module(f".{module}", package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__, list(exports)
