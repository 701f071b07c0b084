"""The generated protobuf/gRPC modules, generated on first import when missing or stale.

Owns: the one import of `service._proto.safety.v1` (so a fresh editable install works without running
`python -m service.protogen` first). Must not know: anything about serving.
"""

from service.protogen import ensure_generated

ensure_generated()

from service._proto.safety.v1 import safety_pb2 as pb2  # noqa: E402
from service._proto.safety.v1 import safety_pb2_grpc as pb2_grpc  # noqa: E402

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["SafetyClassifier"].full_name

__all__ = ["SERVICE_NAME", "pb2", "pb2_grpc"]
