"""CPU limits from cgroup files (written here), torch's thread setting, and OS thread names."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from model.threads import available_cpus, cgroup_quota, configure_threads, cpu_limit, name_os_thread


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path) is None


def test_no_cgroup_means_affinity(tmp_path: Path) -> None:
    import os

    assert cgroup_quota(tmp_path) is None
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_quota_caps_the_affinity_rounding_up(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU -> one thread, never zero
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("100000000 100000\n")  # 1000 CPUs -> the affinity mask wins
    import os

    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_cpu_limit_is_the_affinity_capped_by_the_quota_rounded_up() -> None:
    assert cpu_limit(64, None) == 64  # no quota: the affinity mask
    assert cpu_limit(64, 4.0) == 4  # a Kubernetes limit of 4 CPUs on a 64-core node
    assert cpu_limit(64, 2.5) == 3  # a fraction of a CPU rounds up
    assert cpu_limit(2, 8.0) == 2  # a quota above the mask: the mask
    assert cpu_limit(8, 0.1) == 1  # never zero
    assert cpu_limit(0, None) == 1


def test_configure_threads_sets_torch() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_threads(environ={}) == available_cpus() == torch.get_num_threads()
        assert configure_threads(environ={"OMP_NUM_THREADS": "1"}) == 1 == torch.get_num_threads()
        assert configure_threads(2, environ={"OMP_NUM_THREADS": "1"}) == 2  # the explicit setting wins
        assert configure_threads(environ={"OMP_NUM_THREADS": "lots"}) == available_cpus()
        # the model on a GPU: one torch CPU thread unless the operator says otherwise
        assert configure_threads(environ={}, accelerator=True) == 1 == torch.get_num_threads()
        assert configure_threads(environ={"OMP_NUM_THREADS": "3"}, accelerator=True) == 3
        assert configure_threads(2, environ={}, accelerator=True) == 2
        with pytest.raises(ValueError, match="threads"):
            configure_threads(-2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc thread names are Linux's")
def test_os_thread_name_follows_the_python_name_and_is_cut_to_15_bytes() -> None:
    seen: dict[str, str] = {}

    def body(key: str, name: str | None) -> None:
        name_os_thread(name)
        seen[key] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    for key, name in (("own", None), ("given", "a-much-longer-name-than-fifteen")):
        t = threading.Thread(target=body, args=(key, name), name="safety-test")
        t.start()
        t.join()
    assert seen == {"own": "safety-test", "given": "a-much-longer-n"}
    assert Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip() != "safety-test"
