"""The runner's launch/collect split and its one-batch-ahead pipeline equal batch-by-batch forward."""

from __future__ import annotations

from pathlib import Path

import torch

from model import load_classifier


def _seqs(lengths: list[int]) -> list[list[int]]:
    return [[1, *[(7 * n + j) % 90 + 5 for j in range(n)], 2] for n in lengths]


def test_run_yields_each_batch_in_order(tiny_classifier) -> None:
    runner = tiny_classifier.runner
    batches = [_seqs([3, 40]), _seqs([100]), _seqs([5, 6, 7])]
    outs = list(runner.run(batches))
    assert [o.shape[0] for o in outs] == [2, 1, 3]
    for out, batch in zip(outs, batches, strict=True):
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        assert torch.equal(out, runner.forward(batch))
    assert list(runner.run([])) == []


def test_launched_batch_reports_its_device_time(tiny_classifier) -> None:
    """On the CPU the forward runs inside `launch`: its wall time is the batch's device time."""
    import time

    runner = tiny_classifier.runner
    t0 = time.perf_counter()
    launched = runner.launch(_seqs([300, 40, 7]))
    wall = time.perf_counter() - t0
    before = runner.device_seconds
    logits = runner.collect(launched)
    assert runner.device_seconds == before + launched.device_seconds()  # collect keeps the running total
    assert torch.equal(logits, runner.forward(_seqs([300, 40, 7])))
    assert 0 < launched.device_seconds() <= wall
    assert launched.start is None and launched.end is None  # no CUDA events off the GPU
    assert not launched.graphed and runner.replays == 0 and runner.launches >= 2


def test_run_windows_across_many_batches_matches_single_forwards(tiny_model_dir: Path) -> None:
    # a budget this small forces one batch per few sequences, so the pipeline hands over many times
    clf = load_classifier(
        tiny_model_dir, device="cpu", max_tokens=512, max_batch_tokens=512, max_batch_sequences=3
    )
    seqs = _seqs([300, 4, 17, 250, 9, 120, 33, 64, 1, 200])
    plan = clf.plan([len(s) for s in seqs])
    assert len(plan) >= 4
    together = clf.run_windows(seqs)
    one_by_one = torch.cat([clf.forward([s]) for s in seqs])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_a_wrong_device_or_dtype_is_an_input_error_not_a_bare_value_error() -> None:
    """A plain ValueError escaped `safety classify`'s handler (it catches SafetyError) as a traceback."""
    import pytest

    from model.errors import InvalidInputError
    from model.runner import resolve_device, resolve_dtype

    for device in ("tpu", "meta", "cuda:x"):
        with pytest.raises(InvalidInputError, match=r"^device: unsupported device .*; use auto, cpu or cuda"):
            resolve_device(device)
    with pytest.raises(InvalidInputError, match=r"^dtype: unknown dtype 'fp8'; choose from \['bf16'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_an_attention_backend_this_machine_cannot_run_is_an_input_error() -> None:
    """pick_backend's refusals (and the runner's) are InvalidInputError naming the setting, which the CLI
    and the servers report as one line, not a bare ValueError's traceback."""
    import pytest

    from model.attention import pick_backend
    from model.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"^backend: 'varlen' needs a CUDA device, got cpu"):
        pick_backend(torch.device("cpu"), "varlen")
    with pytest.raises(InvalidInputError, match=r"^backend: unknown attention backend 'nope'"):
        pick_backend(torch.device("cpu"), "nope")


class CpuGraphSet:
    """Stands in for model.graphs.GraphSet on the CPU (tests/model/test_graphs.py checks the real one on
    CUDA): buckets, padding and the runner's replay path are the real ones; a "replay" runs the network on
    the padded batch (the CPU kernel pads to the longest sequence, so `max_seqlen` is that, not the
    bucket's)."""

    def __init__(self, forward, shapes, device) -> None:
        self.forward, self.shapes, self.capture_s = forward, shapes, 0.0

    def capture(self) -> float:
        return 0.0

    def describe(self) -> str:
        return f"{len(self.shapes)} stand-in buckets"

    def prepare(self, batch):
        import dataclasses

        from model.graphs import pad_packed, pick_shape

        shape = pick_shape(self.shapes, batch.num_tokens, batch.num_seqs, batch.max_seqlen)
        if shape is None:
            return None
        padded = pad_packed(batch, shape)
        return self.forward, dataclasses.replace(padded, max_seqlen=max(padded.lengths)), batch.num_seqs

    @staticmethod
    def replay(prepared) -> torch.Tensor:
        forward, padded, n = prepared
        return forward(padded)[:n].clone()


def test_a_compiled_runner_takes_the_cuda_load_path_on_the_cpu(
    tiny_model_dir: Path, tiny_classifier, monkeypatch
) -> None:
    """What a compiled CUDA runner does at load, on the CPU: compile on a large batch first (a forward
    through `launch`, which reads the graphs: once an AttributeError, because they were set only after
    it), then capture the graph buckets (a stand-in GraphSet), then replay small batches; ungraphed above
    the top bucket and when asked (the warm-up's last batch, whose token count is not a multiple of 16)."""
    from model import runner as runner_mod

    seen = []  # (tokens, graphs asked for, graphs captured) of every launch
    launch = runner_mod.Runner.launch

    def spy(self, sequences, graphs=True):
        seen.append((sum(map(len, sequences)), graphs, self.graphs is not None))
        return launch(self, sequences, graphs)

    monkeypatch.setattr(runner_mod.Runner, "launch", spy)
    monkeypatch.setattr(runner_mod, "compiles_first_on_a_large_batch", lambda device: True)
    monkeypatch.setattr(runner_mod, "can_graph", lambda device, backend: True)
    monkeypatch.setattr(runner_mod, "GraphSet", CpuGraphSet)
    monkeypatch.setattr(runner_mod, "probe_shape", lambda max_tokens: (200, 3))  # a small "large" batch
    clf = load_classifier(tiny_model_dir, device="cpu", compile=True, graph_tokens=1024)
    runner = clf.runner
    assert runner.compiled and runner.graphs is not None, runner.graph_error
    assert seen == [(600, True, False)]  # the first compile, before the capture
    assert runner.timings["compile_s"] > 0 and runner.timings["graph_capture_s"] >= 0
    assert clf.graphs_text.endswith(" stand-in buckets") and clf.info()["cuda_graphs"] == clf.graphs_text
    small, large = _seqs([40, 3, 100]), _seqs([300, 300, 300, 200])  # 149 and 1,108 tokens
    launched = runner.launch(small)
    assert launched.graphed and runner.replays == 1
    assert torch.allclose(runner.collect(launched), tiny_classifier.forward(small), atol=1e-5)
    for seqs, graphs in ((large, True), (small, False)):
        launched = runner.launch(seqs, graphs=graphs)
        assert not launched.graphed and runner.replays == 1
        assert torch.allclose(runner.collect(launched), tiny_classifier.forward(seqs), atol=1e-5)

    seen.clear()
    clf.warmup(max_length=64)
    *doubling, (tokens, graphs, _) = seen
    assert all(g and t % 16 == 0 for t, g, _ in doubling) and len(doubling) == 4  # lengths 8 ... 64
    assert not graphs and tokens % 16 != 0


def test_a_failed_graph_capture_leaves_the_runner_ungraphed(tiny_model_dir: Path, monkeypatch) -> None:
    from model import runner as runner_mod

    class Refused(CpuGraphSet):
        def capture(self) -> float:
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner_mod, "can_graph", lambda device, backend: True)
    monkeypatch.setattr(runner_mod, "GraphSet", Refused)
    clf = load_classifier(tiny_model_dir, device="cpu")  # graphs None: on where the device can have them
    assert clf.runner.graphs is None
    assert clf.runner.graph_error == "RuntimeError: operation not permitted when stream is capturing"
    assert clf.graphs_text == f"off (capture failed: {clf.runner.graph_error})"
    launched = clf.launch(_seqs([5, 9]))
    assert not launched.graphed and clf.collect(launched).shape == (2, 7)
    assert not clf.runner.capture_graphs([])  # no buckets: says so
    assert "no graph buckets" in clf.runner.graph_error


def test_sequences_the_network_cannot_take_are_input_errors_naming_them(tiny_classifier) -> None:
    """`forward`/`launch` take token ids from any caller (docs/engine-api.md). An id outside the vocabulary
    was an IndexError from the embedding, a sequence over max_position_embeddings a plain ValueError from the
    network, and an empty batch or sequence one from `pack`: none in the error hierarchy."""
    import pytest

    from model.errors import InvalidInputError

    config = tiny_classifier.runner.net.config
    vocab, longest = config.vocab_size, config.max_position_embeddings
    cases = {
        f"sequences[1][2]: token id {vocab} is not in the vocabulary [0, {vocab})": [
            [1, 5, 2], [1, 5, vocab, 2]
        ],
        "sequences[0][1]: token id -1": [[1, -1, 2]],
        f"sequences[2]: has {longest + 1} tokens, more than max_position_embeddings {longest}": [
            [1, 2], [1, 2], [1] * (longest + 1)
        ],
        "sequences[1]: is empty; every sequence": [[1, 2], []],
        "sequences: is empty; a batch needs": [],
    }  # fmt: skip
    for said, sequences in cases.items():
        with pytest.raises(InvalidInputError) as err:
            tiny_classifier.forward(sequences)
        assert str(err.value).startswith(said), str(err.value)
    tiny_classifier.forward([[1, vocab - 1, 0, 2], [1] * longest])  # the edges are fine


def test_collect_waits_for_its_own_batch_read_back_not_the_stream(tiny_classifier) -> None:
    """On CUDA `launch` queues each batch's read-back (a copy to pinned memory and an event after it) right
    behind its forward, and `collect` waits on that event. Reading the device logits in `collect` instead
    (`.float().cpu()` on the compute stream) also waited for the batch launched one ahead, so the device
    idled through the host's work before the next launch. Stand-ins for the CUDA objects: the device
    tensor must not be touched."""
    from model.runner import Launched, Runner

    class DeviceLogits:  # a read of it would be stream-ordered: behind the next batch
        def __getattr__(self, name):
            raise AssertionError(f"collect read the device logits ({name}) instead of the read-back")

    class Event:
        waited = 0

        def synchronize(self) -> None:
            self.waited += 1

        def elapsed_time(self, other) -> float:
            return 5.0

    runner = tiny_classifier.runner
    host, copied, timing = torch.randn(3, 7), Event(), Event()
    launched = Launched(DeviceLogits(), timing, Event(), host=host, copied=copied)  # type: ignore[arg-type]
    before = runner.device_seconds
    assert runner.collect(launched) is host
    assert copied.waited == 1
    assert runner.device_seconds == before + 0.005
    # off CUDA the forward has already run in `launch`: nothing is queued, collect converts as before
    cpu = runner.launch(_seqs([5, 9]))
    assert cpu.host is None and cpu.copied is None and Runner._read_back(cpu) is cpu
