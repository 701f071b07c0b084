"""A rebuilt handler keeps its kind and (de)serializers and runs the new behaviour."""

from __future__ import annotations

import grpc
import pytest

from service.handlers import FACTORIES, kind, with_behavior


def _ser(x: bytes) -> bytes:
    return x


def _de(x: bytes) -> bytes:
    return x


@pytest.mark.parametrize("name", list(FACTORIES))
def test_with_behavior_keeps_kind_and_serializers(name: str) -> None:
    def old(*args: object) -> None:
        return None

    def new(*args: object) -> None:
        return None

    handler = FACTORIES[name](old, request_deserializer=_de, response_serializer=_ser)
    assert kind(handler) == name
    rebuilt = with_behavior(handler, new)
    assert kind(rebuilt) == name and getattr(rebuilt, name) is new
    assert rebuilt.request_deserializer is _de and rebuilt.response_serializer is _ser
    assert isinstance(rebuilt, grpc.RpcMethodHandler)
