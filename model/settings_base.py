"""Settings dataclasses filled from environment variables: the helper under service/ and worker/ settings.

Owns: `setting(default, env, parse, help)`, a dataclass field that carries its variable name, parser and help
text in its metadata; the parsers `opt_int` and `opt_str` and `expects(parse)`, what a parser accepts in
words; `env_name(cls, field)`; and `values_from_env(cls, environ, error, skip)`, which parses every variable
that is set and not empty (the rest keep their defaults), except those of the settings in `skip` (given
another way, a flag or an override: their variables are not read at all), and raises `error(field,
message)` for a value its parser refuses, saying what it expected. Must not know: which
settings exist, how they are validated, the error type a package raises, argparse, gRPC, Celery.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import field, fields
from typing import Any

ErrorFactory = Callable[[str, str], Exception]  # (field name, message) -> the exception to raise


def setting(default: Any, env: str, parse: Callable[[str], Any], help: str) -> Any:
    """A dataclass field read from `env` with `parse` (unset or empty: `default`)."""
    return field(default=default, metadata={"env": env, "parse": parse, "help": help})


def opt_int(value: str) -> int | None:
    """An integer, or None for '', 'auto' or 'none'."""
    return None if value.strip().lower() in ("", "auto", "none") else int(value)


def opt_str(value: str) -> str | None:
    return value or None


_EXPECTS: dict[Callable[[str], Any], str] = {
    int: "an integer",
    float: "a number",
    opt_int: "an integer, or auto or none (unset)",
}


def expects(parse: Callable[[str], Any]) -> str:
    """What `parse` accepts, for an error message: "an integer", "a number", ..."""
    return _EXPECTS.get(parse, "a valid value")


def env_name(cls: type, name: str) -> str:
    """The environment variable of field `name` of the settings dataclass `cls`."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata["env"]
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def values_from_env(
    cls: type, environ: Mapping[str, str] | None, error: ErrorFactory, skip: Collection[str] = ()
) -> dict[str, Any]:
    """{field name: parsed value} for each of `cls`'s variables that is set and not empty in `environ`
    (default: os.environ), but none for the fields named in `skip`: the caller has their values from
    elsewhere, which win, so their variables are not read (a value there that would not parse is ignored,
    like any value there). A value the field's parser refuses (ValueError) raises
    `error(name, "cannot parse 'VALUE': expected an integer")`."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        raw = environ.get(f.metadata["env"])
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError:
            raise error(f.name, f"cannot parse {raw!r}: expected {expects(f.metadata['parse'])}") from None
    return values
