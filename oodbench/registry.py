"""One small registry type, used for models, losses, detectors, datasets and benchmarks.

Adding a member is one decorator (or one `add` call) in the member's own module, as timm does for
models; every lookup error lists the valid names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from oodbench.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a member (a class, a factory or a spec object)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._members: dict[str, T] = {}

    def add(self, name: str, member: T) -> T:
        if name in self._members:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._members[name] = member
        return member

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: `@MODELS.register("resnet18")`."""

        def decorate(member: T) -> T:
            return self.add(name, member)

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._members[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._members)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._members[n]) for n in self.names()]
