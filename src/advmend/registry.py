"""One small registry class, used by every family (models, datasets, attacks, objectives)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, cast

from advmend.errors import ConfigError

T = TypeVar("T")
F = TypeVar("F")  # what register() decorates keeps its own type (a function keeps its signature)


class Registry(Generic[T]):
    """Maps names to factories. Register with a decorator next to the definition, with what the rest of
    the code needs to know about the entry as keyword metadata::

        MODELS = Registry("model")

        @MODELS.register("resnet18", fsr_layers=["layer4"])
        def resnet18(**kw): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[F], F]:
        def deco(obj: F) -> F:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = cast(T, obj)
            self._meta[name] = dict(meta)
            return obj

        return deco

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata `name` was registered with (a copy); a ConfigError for an unknown name."""
        self.get(name)
        return dict(self._meta[name])

    def meta_view(self, key: str) -> Mapping[str, Any]:
        """A live, read-only mapping name -> metadata `key`, over the entries registered with it."""
        return _MetaView(self, key)

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


class _MetaView(Mapping):
    def __init__(self, registry: Registry, key: str) -> None:
        self._registry, self._key = registry, key

    def __getitem__(self, name: str) -> Any:
        meta = self._registry._meta.get(name, {})
        if self._key not in meta:
            raise KeyError(name)
        return meta[self._key]

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._registry.names() if self._key in self._registry._meta[n])

    def __len__(self) -> int:
        return sum(1 for _ in self)
