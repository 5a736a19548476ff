"""Reading values into a tree of typed dataclass sections: config files, KEY=VALUE overrides, --help.

Generic over the sections (config.py declares them). A field's type says what it accepts: int,
float, bool, str, list[...], Optional[...] or Literal[...] (its choices). Every error is one
line that names the dotted key, so a typo never trains silently with a default.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


def field_types(section_cls) -> dict:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def choices(annotation) -> tuple:
    """The allowed values of a Literal[...] field; () for any other type."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def _convert(key: str, value: Any, annotation, from_text: bool) -> Any:
    """`value` as `annotation`, or ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value in allowed:
            return value
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    if origin is typing.Union:  # Optional[X]
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (from_text and value in ("null", "none", "None")):
            return None
        return _convert(key, value, inner, from_text)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if from_text and isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [_convert(key, v.strip() if isinstance(v, str) else v, inner, from_text) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if from_text and word in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return word in ("true", "1", "yes", "on")
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. data.train=123 names a file called "123"
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key {key!r} expects {name}, got {value!r} ({type(value).__name__})")


def _set(config, dotted_key: str, value: Any, from_text: bool) -> None:
    section_name, _, key = dotted_key.partition(".")
    sections = [f.name for f in dataclasses.fields(config)]
    if section_name not in sections or not key:
        raise ConfigError(
            f"unknown config key {dotted_key!r}: keys are SECTION.FIELD with SECTION one of {', '.join(sections)}")
    section = getattr(config, section_name)
    types = field_types(type(section))
    if key not in types:
        raise ConfigError(
            f"unknown config key {dotted_key!r}; valid keys in [{section_name}]: "
            f"{', '.join(f'{section_name}.{k}' for k in types)}")
    setattr(section, key, _convert(dotted_key, value, types[key], from_text))


def apply_dict(config, values: dict) -> None:
    """Applies a nested {section: {field: value}} mapping (as in a config file)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config file must hold a mapping of sections, got {type(values).__name__}")
    for section_name, section_values in values.items():
        if not isinstance(section_values, dict):
            raise ConfigError(f"config section {section_name!r} must be a mapping, got {section_values!r}")
        for key, value in section_values.items():
            _set(config, f"{section_name}.{key}", value, from_text=False)


_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def _unescape(text: str) -> str:
    """`\\n`, `\\t` and `\\\\` typed on a command line mean a newline, a tab and a backslash."""
    return re.sub(r"\\[nt\\]", lambda match: _ESCAPES[match.group(0)], text)


def apply_overrides(config, overrides: list[str]) -> None:
    """Applies command-line KEY=VALUE overrides (`train.max_steps=20`, `student.keep_layers=0,1,29`).

    A VALUE is taken as typed, spaces included (a template may end in one), with `\\n`, `\\t` and
    `\\\\` read as escapes."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.max_steps=20)")
        _set(config, key.strip(), _unescape(value), from_text=True)


def _yaml_loader():
    """PyYAML's safe loader, reading floats as YAML 1.2 and JSON do: PyYAML (YAML 1.1) takes `2e-4`
    and `1e-05`, without a dot, for strings."""
    import yaml  # a dependency of transformers

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    return Loader


def read_config_file(path: str) -> dict:
    """A config file's {section: {key: value}}: JSON for *.json, YAML otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = file.read_text()
    if file.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config file {path} is not valid JSON: line {error.lineno}: {error.msg}") from None
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None


def _type_name(annotation) -> str:
    allowed = choices(annotation)
    if allowed:
        return "one of " + ", ".join(map(str, allowed))
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def describe_options(defaults) -> str:
    """Every key of a config with its default, type (a Literal's choices) and help, for `--help`."""
    lines = []
    for section in dataclasses.fields(defaults):
        values = getattr(defaults, section.name)
        types = field_types(type(values))
        for option in dataclasses.fields(values):
            default = getattr(values, option.name)
            if isinstance(default, list):
                default = ",".join(map(str, default))
            lines.append(f"  {section.name}.{option.name}={default}  ({_type_name(types[option.name])}) "
                         f"{option.metadata['help']}")
    return "\n".join(lines)
