"""Name -> component registries for heads and backbones.

One way in per kind of component: ``register_head`` / ``register_backbone`` decorators,
``get_*`` to look a name up, ``list_*`` with glob patterns, ``create_*`` to build one with
keyword overrides (``None`` values are dropped so that command-line defaults never overwrite a
component's own defaults). Third-party packages register through the entry-point groups
``discretelik.heads`` and ``discretelik.backbones``; those are loaded lazily, the first time a
name is missed or a listing is asked for.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Mapping, TypeVar

__all__ = [
    "register_head",
    "register_backbone",
    "get_head",
    "get_backbone",
    "list_heads",
    "list_backbones",
    "create_head",
    "create_backbone",
    "backbone_config",
    "backbone_presets",
]

T = TypeVar("T")


@dataclass
class _Entry:
    name: str
    factory: Callable[..., Any]
    aliases: tuple[str, ...] = ()
    config_class: type | None = None
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class _Registry:
    """A registry of one kind of component (``kind`` is used in error messages)."""

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, _Entry] = {}
        self._aliases: dict[str, str] = {}
        self._entry_points_loaded = False

    def register(self, entry: _Entry) -> None:
        if isinstance(entry.aliases, str):
            # tuple("ab") would register the one-letter aliases "a" and "b".
            raise TypeError(
                f"{self.kind} {entry.name!r}: aliases must be a tuple of strings, "
                f"got the string {entry.aliases!r}"
            )
        keys = (entry.name, *entry.aliases)
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"{self.kind} {entry.name!r} lists a name more than once: name and aliases {keys}"
            )
        for key in keys:
            if not isinstance(key, str) or not key:
                raise TypeError(f"{self.kind} names must be non-empty strings, got {key!r}")
            if key in self._entries or key in self._aliases:
                owner = self._aliases.get(key, key)
                raise ValueError(
                    f"{self.kind} name {key!r} is already registered (by {owner!r}, "
                    f"{self._entries[owner].factory!r}); choose another name"
                )
        self._entries[entry.name] = entry
        for alias in entry.aliases:
            self._aliases[alias] = entry.name

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._entries or ep.name in self._aliases:
                continue
            obj = ep.load()  # importing the plugin module may register it by decorator
            if ep.name not in self._entries and ep.name not in self._aliases:
                meta = getattr(obj, "_discretelik_registration", {})
                self.register(_Entry(name=ep.name, factory=obj, **meta))

    def entry(self, name: str) -> _Entry:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        canonical = self._aliases.get(name, name)
        if canonical not in self._entries:
            self._load_entry_points()
            canonical = self._aliases.get(name, name)
        if canonical not in self._entries:
            known = sorted([*self._entries, *self._aliases])
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}.{hint} Registered {self.kind}s: "
                f"{', '.join(self.names())}"
            )
        return self._entries[canonical]

    def names(self, pattern: str = "*") -> list[str]:
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a glob string, got {type(pattern).__name__}")
        self._load_entry_points()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))


_HEADS = _Registry("head", "discretelik.heads")
_BACKBONES = _Registry("backbone", "discretelik.backbones")


def _aliases(aliases: Any) -> Any:
    """``tuple(aliases)``, except that a string is passed through for ``register`` to reject."""
    return aliases if isinstance(aliases, str) else tuple(aliases)


def register_head(name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
    """Class decorator that registers a head under ``name`` (and ``aliases``).

    The decorated object is called with keyword arguments by [`create_head`][discretelik.create_head]
    and [`build`][discretelik.build]; it must return a [`Head`][discretelik.Head].

    Args:
        name: Canonical name, e.g. ``"dlm"``.
        aliases: Other names that resolve to the same head.

    Raises:
        ValueError: If ``name`` or an alias is already taken.
    """

    def decorator(obj: T) -> T:
        _HEADS.register(_Entry(name=name, factory=obj, aliases=_aliases(aliases)))  # type: ignore[arg-type]
        return obj

    return decorator


def register_backbone(
    name: str,
    aliases: tuple[str, ...] = (),
    *,
    config: type | None = None,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[T], T]:
    """Class decorator that registers a backbone under ``name``.

    Args:
        name: Canonical name, e.g. ``"pixelcnn++"``.
        aliases: Other names that resolve to the same backbone.
        config: The backbone's ``@dataclass`` config. When given, the backbone is constructed as
            ``factory(config(**fields))``; otherwise as ``factory(**kwargs)``.
        presets: Named keyword defaults, e.g. ``{"tiny": {...}, "paper": {...}}``.

    Raises:
        ValueError: If ``name`` or an alias is already taken.
    """

    def decorator(obj: T) -> T:
        _BACKBONES.register(
            _Entry(
                name=name,
                factory=obj,  # type: ignore[arg-type]
                aliases=_aliases(aliases),
                config_class=config,
                presets=dict(presets or {}),
            )
        )
        return obj

    return decorator


def get_head(name: str) -> Callable[..., Any]:
    """Return the head class (or factory) registered under ``name`` or one of its aliases.

    Raises:
        ValueError: If no head has that name; the message lists close matches.
    """
    return _HEADS.entry(name).factory


def get_backbone(name: str) -> Callable[..., Any]:
    """Return the backbone class (or factory) registered under ``name`` or an alias.

    Raises:
        ValueError: If no backbone has that name; the message lists close matches.
    """
    return _BACKBONES.entry(name).factory


def list_heads(pattern: str = "*") -> list[str]:
    """Sorted canonical names of the registered heads that match a glob ``pattern``."""
    return _HEADS.names(pattern)


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted canonical names of the registered backbones that match a glob ``pattern``."""
    return _BACKBONES.names(pattern)


def _drop_none(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def create_head(name: str, **kwargs: Any) -> Any:
    """Build the head registered under ``name``; ``None``-valued keyword arguments are dropped.

    Example:
        >>> head = create_head("dlm", mixtures=5, in_channels=64)
    """
    return _HEADS.entry(name).factory(**_drop_none(kwargs))


def backbone_presets(name: str) -> list[str]:
    """Names of the presets of the backbone registered under ``name``."""
    return sorted(_BACKBONES.entry(name).presets)


def backbone_config(name: str, preset: str | None = None, **kwargs: Any) -> Any:
    """The config a backbone would be built with: preset defaults, then ``kwargs`` on top.

    Args:
        name: Registered backbone name.
        preset: One of [`backbone_presets(name)`][discretelik.backbone_presets], or ``None``
            for the config class's own defaults.
        **kwargs: Field overrides; ``None`` values are dropped.

    Raises:
        ValueError: Unknown preset, or unknown config fields (the message lists valid fields).
    """
    entry = _BACKBONES.entry(name)
    if entry.config_class is None:
        raise ValueError(f"backbone {name!r} was registered without a config class")
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in entry.presets:
            raise ValueError(
                f"unknown preset {preset!r} for backbone {name!r}; "
                f"expected one of {sorted(entry.presets)}"
            )
        values.update(entry.presets[preset])
    values.update(_drop_none(kwargs))
    valid = {f.name for f in dataclasses.fields(entry.config_class)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for backbone {name!r}; valid options: {sorted(valid)}"
        )
    return entry.config_class(**values)


def create_backbone(name: str, preset: str | None = None, **kwargs: Any) -> Any:
    """Build the backbone registered under ``name`` from a preset plus keyword overrides.

    Example:
        >>> net = create_backbone("pixelcnn++", preset="tiny", in_channels=1)
    """
    entry = _BACKBONES.entry(name)
    if entry.config_class is None:
        if preset is not None:
            raise ValueError(f"backbone {name!r} has no presets; got preset={preset!r}")
        return entry.factory(**_drop_none(kwargs))
    return entry.factory(backbone_config(name, preset, **kwargs))
