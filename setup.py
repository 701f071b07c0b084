"""Wheel-build hook: generate the gRPC stubs (and ship the .proto) inside the wheel.

Everything else about the package lives in pyproject.toml. `build_py` runs `service/protogen.py` into the
build directory, so a wheel carries `service/_proto/safety/v1/{safety_pb2,safety_pb2_grpc}.py(i)` and a copy
of `safety.proto`. Editable installs skip it: there the stubs are generated on first import instead.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        spec = importlib.util.spec_from_file_location("_protogen", ROOT / "service" / "protogen.py")
        protogen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(protogen)
        protogen.generate(Path(self.build_lib) / "service" / "_proto", proto_root=ROOT / "proto")


setup(cmdclass={"build_py": BuildPyWithStubs})
