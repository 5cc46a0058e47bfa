"""Frozen-dataclass parameters, and the coercion of ``-o KEY VALUE`` text into them.

Every attack, defence and exporter declares a ``Params`` dataclass; its fields (with a
``help`` entry in the field metadata) are the one vocabulary shown by ``show`` commands and
accepted by ``-o``. Unknown keys are an error listing the valid ones, never silently dropped.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from robustkit.errors import ParamsError
from robustkit.threat import parse_number

P = TypeVar("P")


def param(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str
    default: Any
    help: str


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + "?"
    return getattr(tp, "__name__", str(tp))


def describe(params_cls: type) -> list[ParamInfo]:
    """Fields of a params dataclass with their types, defaults and help, in order."""
    hints = typing.get_type_hints(params_cls)
    infos = []
    for f in dataclasses.fields(params_cls):
        default = f.default if f.default is not MISSING else None
        infos.append(ParamInfo(f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return infos


def _coerce_value(key: str, value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce_value(key, value, options[0])
    if origin is Literal:
        allowed = get_args(tp)
        for option in allowed:
            if value == option or (isinstance(value, str) and str(option) == value.strip()):
                return option
        raise ParamsError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ParamsError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ParamsError(f"{key} must be an integer; got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = parse_number(value) if isinstance(value, str) else float(value)
        except Exception:
            raise ParamsError(f"{key} must be an integer; got {value!r}") from None
        if number != int(number):
            raise ParamsError(f"{key} must be an integer; got {value!r}")
        return int(number)
    if tp is float:
        try:
            return parse_number(value)
        except Exception:
            raise ParamsError(f"{key} must be a number (e.g. 0.01 or 2/255); got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def coerce(params_cls: type[P], overrides: Mapping[str, Any] | None = None, *, owner: str = "") -> P:
    """Build ``params_cls`` from defaults plus ``overrides`` (text or typed values).

    Keys may use dashes or underscores. An unknown key raises ``ParamsError`` naming the
    valid keys, so a typo never runs an attack with silently default settings.
    """
    hints = typing.get_type_hints(params_cls)
    valid = [f.name for f in dataclasses.fields(params_cls)]  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for raw_key, value in (overrides or {}).items():
        key = raw_key.replace("-", "_")
        if key not in valid:
            where = f" for {owner}" if owner else ""
            raise ParamsError(
                f"unknown parameter {raw_key!r}{where}; valid parameters: {', '.join(valid) or '(none)'}"
            )
        values[key] = _coerce_value(key, value, hints[key])
    try:
        return params_cls(**values)
    except ParamsError:
        raise
    except (TypeError, ValueError) as err:
        raise ParamsError(f"invalid parameters{' for ' + owner if owner else ''}: {err}") from None


@dataclass(frozen=True)
class NoParams:
    """For plugins without settings."""


class Configurable:
    """What attacks, defences and exporters share: a registered name and frozen ``Params``.

    They hold settings only; the model and data come at call time (as in foolbox 3).
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""

    def __init__(self, params: Any = None, /, **overrides: Any) -> None:
        if params is not None and overrides:
            raise TypeError("pass either a Params instance or keyword overrides, not both")
        self.params = params if params is not None else coerce(self.Params, overrides, owner=self.name)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Any:
        """Build from ``-o KEY VALUE`` pairs (text), rejecting unknown keys."""
        return cls(coerce(cls.Params, options, owner=cls.name))
