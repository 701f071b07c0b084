"""A Prometheus exporter's /metrics page in tests: its text, or its samples by series."""

from __future__ import annotations

import urllib.request


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def scrape(port: int) -> dict[str, float]:
    """{'name{labels}': value} of every sample on the page."""
    samples = {}
    for line in metrics_text(port).splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
