"""Presets and typed, validated config overrides.

A method's ``Config`` dataclass holds the paper's settings; ``presets`` on the method are small named override
sets (``smoke``, ``quick``); ``paper`` is the defaults. An optional ``task_presets`` adds a preset's settings for
one task (``{"quick": {"<task id>": {...}}}``). Command-line overrides ``--set [method.]field=value`` are
parsed by the field's type; an unknown or ill-typed field is an error that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from bench.registry import AdaptBenchError, UnknownNameError

PRESETS: dict[str, str] = {
    "smoke": "seconds per run; checks that everything runs end to end (CI)",
    "quick": "minutes per run on a 2-core CPU laptop; budgets and sizes shrunk, algorithms unchanged",
    "paper": "the papers' budgets and settings; for GPUs or a cluster",
}


class ConfigError(AdaptBenchError, ValueError):
    """An invalid config value or override; the message names the field."""


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise UnknownNameError("preset", preset, list(PRESETS), "Presets: " + ", ".join(PRESETS) + ".")
    return preset


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, raw: Any, tp: Any) -> Any:
    """Convert ``raw`` (a string from the CLI, or a Python value from a preset) to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, raw, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config field `{name}`: {raw!r} is not a valid {tp}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if raw == c or (isinstance(raw, str) and str(c) == raw):
                return c
        raise ConfigError(f"config field `{name}`: {raw!r} is not one of {list(choices)}")
    if origin in (tuple, list):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        args = typing.get_args(tp)
        inner = args[0] if args else str
        out = [_coerce(name, x.strip() if isinstance(x, str) else x, inner) for x in items if x != ""]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"config field `{name}` expects a bool (true/false), got {raw!r}")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(f"config field `{name}` expects an int, got {raw!r}")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                pass
            try:  # accept 1e5-style integers, but not 0.5
                f = float(raw)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"config field `{name}` expects an int, got {raw!r}")
    if tp is float:
        value = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw)
            except ValueError:
                pass
        if value is None:
            raise ConfigError(f"config field `{name}` expects a float, got {raw!r}")
        if not math.isfinite(value):  # a nan learning rate would train to nan under a new, valid-looking run id
            raise ConfigError(f"config field `{name}` expects a finite float, got {raw!r}")
        return value
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"config field `{name}` expects a string, got {raw!r}")
    if dataclasses.is_dataclass(tp) and isinstance(raw, tp):
        return raw
    if isinstance(tp, type) and isinstance(raw, tp):
        return raw
    raise ConfigError(f"config field `{name}` of type {tp} cannot be set from {raw!r}")


def apply_overrides(config: Any, overrides: dict[str, Any], where: str) -> Any:
    """Return a copy of dataclass ``config`` with ``overrides`` applied, each validated against its type."""
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(config)}
    types_ = _field_types(type(config))
    changes = {}
    for key, raw in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f" Did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ConfigError(f"{where}: unknown config field `{key}`.{hint} Fields: {', '.join(sorted(fields))}")
        changes[key] = _coerce(key, raw, types_[key])
    new = dataclasses.replace(config, **changes)
    validate = getattr(new, "validate", None)
    if callable(validate):  # a Config may check cross-field constraints
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e
    return new


def resolve_config(method: Any, preset: str, overrides: dict[str, Any] | None = None, task: Any = None) -> Any:
    """``Config()`` + ``method.presets[preset]`` + ``method.task_presets[preset][task]`` + ``overrides``; ``None``
    for methods without a Config.

    ``task`` (a task id, or a spec with an ``id``) selects the method's optional per-task preset: a setting a
    preset needs on one task only, chosen by measurement (for example AD's evaluation context on a task whose
    quick context is capped below the paper's). It sits between the preset and the command line, so an explicit
    ``--set`` still wins; without ``task`` it is left out.
    """
    check_preset(preset)
    cls = getattr(method, "Config", None)
    if cls is None:
        if overrides:
            raise ConfigError(f"method `{method.name}` has no config; cannot set {sorted(overrides)}")
        return None
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"method `{method.name}`: Config must be a dataclass")
    config = cls()
    presets = getattr(method, "presets", {}) or {}
    config = apply_overrides(config, dict(presets.get(preset, {})), f"method `{method.name}` preset `{preset}`")
    if task is not None:
        task_id = getattr(task, "id", task)
        per_task = task_preset(method, preset, task_id)
        config = apply_overrides(config, per_task, f"method `{method.name}` preset `{preset}` on task `{task_id}`")
    return apply_overrides(config, dict(overrides or {}), f"method `{method.name}`")


def task_preset(method: Any, preset: str, task_id: str) -> dict[str, Any]:
    """``method.task_presets[preset][task_id]`` (``{}`` where the method has none for that task)."""
    table = getattr(method, "task_presets", None) or {}
    shape = "task_presets must be {preset: {task id: {field: value}}}"
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ConfigError(f"method `{method.name}`: {shape}")
    entry = table.get(preset, {}).get(task_id, {})
    if not isinstance(entry, dict):
        raise ConfigError(f"method `{method.name}`: {shape}; task_presets[{preset!r}][{task_id!r}] is {entry!r}")
    return dict(entry)


def config_to_dict(config: Any) -> dict[str, Any] | None:
    return None if config is None else dataclasses.asdict(config)


OMIT_DEFAULT_FROM_RUN_ID = {"run_id": "omit-default"}
"""``dataclasses.field(metadata=...)`` for a config field added after runs were stored: at its default value it is
left out of the run id (:func:`run_id_omissions`), so those runs, which behaved as the default does, keep their
ids and a sweep's resume still finds them; any other value is part of the id as usual."""


def run_id_omissions(config: Any) -> tuple[str, ...]:
    """Names of ``config``'s fields marked :data:`OMIT_DEFAULT_FROM_RUN_ID` that hold their default."""
    if config is None:
        return ()
    return tuple(f.name for f in dataclasses.fields(config)
                 if f.metadata.get("run_id") == "omit-default" and getattr(config, f.name) == f.default)


def identity_dict(config: Any) -> dict[str, Any]:
    """``config`` as a dict without the fields of :func:`run_id_omissions`: what a run id, a checkpoint's config
    check or an artifact key compares, so a checkpoint or artifact written before those fields existed still
    matches."""
    omit = set(run_id_omissions(config))
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in omit}


def parse_set_args(items: list[str]) -> dict[str | None, dict[str, str]]:
    """``["lr=1e-4", "drqv2.batch=64"]`` -> ``{None: {"lr": "1e-4"}, "drqv2": {"batch": "64"}}``."""
    out: dict[str | None, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override `{item}` is not of the form [method.]field=value")
        method, dot, field = key.rpartition(".")
        out.setdefault(method if dot else None, {})[field] = value
    return out
