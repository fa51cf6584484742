"""One small generic registry: lazy ``"module:attr"`` targets, duplicate detection, close-match errors.

Modelled on lm-evaluation-harness's ``lm_eval/api/registry.py``; plugins are discovered with
``importlib.metadata.entry_points(group=...)`` and loaded lazily, never at ``import bench``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Generic, TypeVar

T = TypeVar("T")


class AdaptBenchError(Exception):
    """Base class of every error the suite raises on purpose."""


class UnknownNameError(AdaptBenchError, LookupError):
    """A name that is not in a registry; the message carries close matches."""

    def __init__(self, kind: str, name: str, known: list[str], hint: str = "") -> None:
        self.kind, self.name, self.known = kind, name, known
        matches = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        if not matches:  # case-insensitive second chance: `darkroom-v0` -> `DarkRoom-v0`
            lowered = {k.lower(): k for k in known}
            matches = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=3)]
        msg = f"Unknown {kind} `{name}`."
        if matches:
            msg += " Did you mean " + " or ".join(f"`{m}`" for m in matches) + "?"
        if hint:
            msg += f" {hint}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError-style repr quoting would be noisy in a CLI
        return self.args[0]


class DuplicateNameError(AdaptBenchError):
    """Two providers registered the same name."""


def load_target(target: str) -> object:
    """Import ``"package.module:attr.sub"`` and return the attribute."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"target `{target}` is not of the form `module:attr`")
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class _Entry(Generic[T]):
    target: str | T
    provider: str  # the distribution (or module) that registered it; named in duplicate errors
    loaded: T | None = None


class Registry(Generic[T]):
    """Name -> object, where an object may be given as a lazy ``"module:attr"`` string.

    ``kind`` names what is stored (used in error messages); ``hint`` tells the user where to look;
    ``prepare(name, obj)`` validates a loaded target and returns what the registry hands out.
    """

    def __init__(self, kind: str, hint: str = "", prepare: Callable[[str, object], T] | None = None) -> None:
        self.kind, self.hint = kind, hint
        self._entries: dict[str, _Entry[T]] = {}
        self._prepare = prepare

    def register(self, name: str, target: str | T, provider: str = "<code>", *, replace: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        old = self._entries.get(name)
        if old is not None and not replace:
            if old.provider == provider and old.target == target:
                return  # idempotent re-registration (e.g. a module imported twice)
            raise DuplicateNameError(
                f"{self.kind} `{name}` is declared twice: by `{old.provider}` and by `{provider}`. "
                f"Uninstall one of them or rename its {self.kind}."
            )
        self._entries[name] = _Entry(target, provider)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def provider(self, name: str) -> str:
        return self._entry(name).provider

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names(), self.hint) from None

    def get(self, name: str) -> T:
        entry = self._entry(name)
        if entry.loaded is None:
            obj = load_target(entry.target) if isinstance(entry.target, str) else entry.target
            if self._prepare is not None:  # validate / instantiate what the target named
                obj = self._prepare(name, obj)
            entry.loaded = obj  # type: ignore[assignment]
        return entry.loaded  # type: ignore[return-value]


def iter_entry_points(group: str) -> list[tuple[str, str, str]]:
    """``(name, "module:attr", distribution)`` for every entry point in ``group``, sorted by name."""
    out = []
    for ep in metadata.entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
        out.append((ep.name, ep.value, dist))
    return sorted(out)
