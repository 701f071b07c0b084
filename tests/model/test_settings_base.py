"""model.settings_base: env-backed settings dataclasses, as service/ and worker/ settings use them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from model.settings_base import env_name, opt_int, opt_str, setting, values_from_env


@dataclass(frozen=True)
class Demo:
    size: int = setting(8, "DEMO_SIZE", int, "items per thing")
    limit: int | None = setting(None, "DEMO_LIMIT", opt_int, "a bound (unset: none)")
    name: str | None = setting(None, "DEMO_NAME", opt_str, "a name")


class Refused(Exception):
    pass


def refuse(name: str, message: str) -> Refused:
    return Refused(f"{env_name(Demo, name)}: {message}")


def test_fields_carry_variable_parser_and_help() -> None:
    assert Demo() == Demo(size=8, limit=None, name=None)
    assert env_name(Demo, "limit") == "DEMO_LIMIT"
    with pytest.raises(KeyError, match="no setting 'nope'"):
        env_name(Demo, "nope")


def test_set_variables_are_parsed_unset_and_empty_ones_keep_the_default() -> None:
    env = {"DEMO_SIZE": "3", "DEMO_LIMIT": "auto", "DEMO_NAME": "", "OTHER": "x"}
    assert values_from_env(Demo, env, refuse) == {"size": 3, "limit": None}
    assert values_from_env(Demo, {"DEMO_LIMIT": "12"}, refuse) == {"limit": 12}
    assert values_from_env(Demo, {}, refuse) == {}


def test_the_variables_of_skipped_settings_are_not_read() -> None:
    env = {"DEMO_SIZE": "many", "DEMO_LIMIT": "12"}
    assert values_from_env(Demo, env, refuse, skip={"size"}) == {"limit": 12}
    with pytest.raises(Refused, match=r"^DEMO_SIZE: cannot parse 'many'"):
        values_from_env(Demo, env, refuse, skip={"limit"})


def test_the_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_SIZE", "5")
    assert values_from_env(Demo, None, refuse) == {"size": 5}


def test_a_value_that_does_not_parse_raises_the_callers_error_naming_the_variable() -> None:
    with pytest.raises(Refused, match=r"^DEMO_SIZE: cannot parse 'many': expected an integer$"):
        values_from_env(Demo, {"DEMO_SIZE": "many"}, refuse)
    with pytest.raises(
        Refused, match=r"^DEMO_LIMIT: cannot parse '1.5': expected an integer, or auto or none"
    ):
        values_from_env(Demo, {"DEMO_LIMIT": "1.5"}, refuse)
