"""One small registry class, used by every family (models, datasets, attacks, objectives)."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from advmend.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories. Register with a decorator next to the definition::

        MODELS = Registry("model")

        @MODELS.register("resnet18")
        def resnet18(**kw): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
