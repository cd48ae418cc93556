"""A registry of classes by name (adaptation methods, anomaly methods): a decorator to add one, a checked lookup."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(dict[str, Any]):
    """``{name: class}`` with :meth:`register` (a class decorator) and :meth:`lookup` (clear errors).

    A registered class gets its name as the class attribute ``method``.

    Example:
        >>> shapes = Registry("shape")
        >>> @shapes.register("square")
        ... class Square:
        ...     pass
        >>> shapes.lookup("square").method
        'square'
        >>> shapes.lookup("sqare")
        Traceback (most recent call last):
        ...
        frugalvision.errors.ConfigError: unknown shape 'sqare'; did you mean square? (available: square)
    """

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator adding a class under ``name`` (another class under the same name is an error)."""

        def deco(cls: T) -> T:
            if name in self and self[name] is not cls:
                raise ValueError(f"{self.what} {name!r} is already registered by {self[name].__name__}")
            cls.method = name  # type: ignore[attr-defined]
            self[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self)

    def lookup(self, name: str) -> Any:
        """The class registered as ``name``; an unknown name raises a ``ConfigError`` naming the close matches."""
        if name not in self:
            close = difflib.get_close_matches(name, list(self), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown {self.what} {name!r}{hint} (available: {', '.join(self.names())})")
        return self[name]
