"""Old public names that keep working for a release, with a ``DeprecationWarning`` naming the new one: renamed
keyword arguments (:func:`renamed_arguments`; moved names of a package are in
:func:`~scgpt_protocol.core.lazy.lazy_exports`)."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

__all__ = ["renamed_arguments"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_arguments(**renames: str) -> Callable[[F], F]:
    """Accept each old keyword argument (``old="new"``) as its new name, with a ``DeprecationWarning``.

    Passing both the old and the new name is a ``TypeError`` that names both.

    Examples
    --------
    >>> @renamed_arguments(obs_key="key_added")
    ... def annotate(adata, *, key_added="scgpt_label"):
    ...     return key_added
    """

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    msg = f"{func.__name__}() got {old}= and {new}=; {old} is the old name of {new}: pass only {new}="
                    raise TypeError(msg)
                warnings.warn(f"{func.__name__}({old}=...) is now {func.__name__}({new}=...); the old name goes in a "
                              "later release", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
