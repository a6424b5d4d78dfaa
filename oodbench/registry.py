"""One small registry type, used for models, losses, detectors, datasets, checkpoint formats and
report output formats.

There is one way to add a member, as timm does for models: a decorator on the class or factory
in the member's own module, with the name written out literally so `grep '"resnet18"'` finds it:

    @MODELS.register("resnet18", summary="CIFAR ResNet-18", block_activations=("relu",))
    def resnet18(in_channels, image_size, block_activation="relu"): ...

The decorator returns the decorated object unchanged. What is stored is `entry(obj, **metadata)`:
each registry chooses its `entry` (e.g. building a `ModelSpec` from the factory and metadata), so
lookups return the same spec objects whatever the registration looks like. Without an `entry`,
the object itself is stored and each metadata keyword is set on it as an attribute (a detector
class's `summary`). Every lookup error lists the valid names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from oodbench.errors import UnknownNameError

T = TypeVar("T")
M = TypeVar("M")


def _set_attributes(member: Any, **metadata: Any) -> Any:
    for key, value in metadata.items():
        setattr(member, key, value)
    return member


class Registry(Generic[T]):
    """Maps a name to a member (a class, a factory or a spec object built from one)."""

    def __init__(self, kind: str, entry: Callable[..., T] | None = None) -> None:
        self.kind = kind
        self._entry: Callable[..., T] = entry or _set_attributes
        self._members: dict[str, T] = {}

    def register(self, name: str, **metadata: Any) -> Callable[[M], M]:
        """Decorator: `@REGISTRY.register("name", **metadata)` on a class or function."""

        def decorate(member: M) -> M:
            self._add(name, self._entry(member, **metadata))
            return member

        return decorate

    def _add(self, name: str, member: T) -> T:
        if name in self._members:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._members[name] = member
        return member

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
