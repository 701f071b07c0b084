"""Whether files changed since they were last looked at: a cheap stat-based signature.

Owns: `signature(*paths)`, what tells a changed file: its modification time, size, inode and device (a
Kubernetes Secret volume swaps a symlink to new files, so the inode changes even where the time does not);
None for a file that cannot be stat'ed. Used for the API key file (service/apikeys.py) and the TLS files
(service/tls.py). Must not know: what the files hold.
"""

from __future__ import annotations

import os

Signature = tuple[tuple[int, int, int, int] | None, ...]


def signature(*paths: str) -> Signature:
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows symlinks
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(out)
