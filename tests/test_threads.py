"""CpuThreads: the CPU thread count of a training, fixed or chosen by timing its steps."""

from __future__ import annotations

import logging

import pytest
import torch

from scgpt_protocol.adapt import threads as threads_mod
from scgpt_protocol.adapt.threads import CpuThreads

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


class Clock:
    """A stand-in for time.perf_counter: each step lasts what ``cost(threads)`` says."""

    def __init__(self, cost):
        self.now, self.cost = 0.0, cost

    def __call__(self):
        return self.now

    def run(self, chooser, work=1.0):
        with chooser.step(work):
            used = torch.get_num_threads()
            self.now += self.cost(used) * work
        return used


def test_a_fixed_count_holds_for_the_training_and_is_given_back(two_threads):
    chooser = CpuThreads(CPU, 1)
    assert torch.get_num_threads() == 1 and not chooser.auto
    for _ in range(5):
        with chooser.step(1.0):
            assert torch.get_num_threads() == 1
    chooser.close()
    assert torch.get_num_threads() == two_threads


def test_one_thread_is_chosen_while_it_is_faster_and_the_count_is_given_back(two_threads, monkeypatch, caplog):
    # another job holds a core: a step takes 4 s on 2 threads, 1 s on 1
    clock = Clock(lambda n: 4.0 if n == 2 else 1.0)
    monkeypatch.setattr(threads_mod.time, "perf_counter", clock)
    chooser = CpuThreads(CPU, "auto", probe=2, recheck=10)
    with caplog.at_level(logging.INFO, logger=threads_mod.__name__):
        used = [clock.run(chooser, work=w) for w in [1.0, 1.0, 2.0, 0.5, 3.0] + [1.0] * 10]
    # warm-up and two timed steps on torch's count, two on one thread, then the faster: one thread
    assert used[:5] == [2, 2, 2, 1, 1] and set(used[5:]) == {1}
    step, rates = chooser.choices[0]
    assert step == 4 and rates == {2: 4.0, 1: 1.0}  # seconds per unit of work: lengths do not bias it
    assert "CPU training on 1 thread from step 6, 4.0x faster than on 2 (another job" in caplog.text
    chooser.close()
    assert torch.get_num_threads() == two_threads


def test_the_choice_is_measured_again_later_and_follows_the_machine(two_threads, monkeypatch):
    busy = {"on": True}
    clock = Clock(lambda n: (4.0 if n == 2 else 1.0) if busy["on"] else (0.5 if n == 2 else 1.0))
    monkeypatch.setattr(threads_mod.time, "perf_counter", clock)
    chooser = CpuThreads(CPU, "auto", probe=1, recheck=3)
    used = [clock.run(chooser) for _ in range(6)]
    assert used[-1] == 1  # the other job runs: one thread
    busy["on"] = False  # it ended: the next comparison goes back to torch's count
    used = [clock.run(chooser) for _ in range(6)]
    assert used[-1] == 2 and [c for _, c in chooser.choices][-1] == {2: 0.5, 1: 1.0}
    waits = [b[0] - a[0] for a, b in zip(chooser.choices, chooser.choices[1:])]
    assert waits and all(w >= 3 for w in waits)


def test_the_wait_between_comparisons_grows_while_the_choice_holds(two_threads, monkeypatch, caplog):
    clock = Clock(lambda n: 1.0 if n == 2 else 2.0)  # a free machine: torch's count stays
    monkeypatch.setattr(threads_mod.time, "perf_counter", clock)
    chooser = CpuThreads(CPU, "auto", probe=1, recheck=2)
    with caplog.at_level(logging.INFO, logger=threads_mod.__name__):
        used = [clock.run(chooser) for _ in range(60)]
    # the first comparison is said, the ones that change nothing are not
    assert caplog.text.count("threads auto: CPU training on 2 threads from step 4, 2.0x faster than on 1\n") == 1
    assert caplog.text.count("threads auto") == 1
    starts = [step for step, _ in chooser.choices]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1] <= 8 * 2 + 2  # doubles, up to 8x recheck
    assert used.count(1) == len(chooser.choices)  # one probe step on one thread per comparison, no more


def test_nothing_changes_by_default_off_the_cpu_or_with_one_thread(two_threads, monkeypatch):
    clock = Clock(lambda n: 4.0 if n == 2 else 1.0)
    monkeypatch.setattr(threads_mod.time, "perf_counter", clock)
    default = CpuThreads(CPU)  # None: torch's count, whatever the timings (runs repeat bit for bit)
    assert {clock.run(default) for _ in range(20)} == {2} and not default.choices
    chooser = CpuThreads(torch.device("cuda"), "auto")  # the device is not used, only its type
    assert not chooser.auto and chooser.current == torch.get_num_threads()
    assert CpuThreads(torch.device("cuda"), 1).current == 2
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert not CpuThreads(CPU, "auto").auto  # one thread already: nothing to compare
    finally:
        torch.set_num_threads(before)


def test_settle_leaves_a_comparison_on_the_chosen_count(two_threads, monkeypatch):
    clock = Clock(lambda n: 4.0 if n == 2 else 1.0)
    monkeypatch.setattr(threads_mod.time, "perf_counter", clock)
    chooser = CpuThreads(CPU, "auto", probe=2, recheck=10)
    used = [clock.run(chooser) for _ in range(10)]  # chose 1 thread; the next comparison starts at step 15
    used += [clock.run(chooser) for _ in range(6)]  # an epoch ends inside it, on torch's count
    assert used[-1] == 2 and chooser.current == 1
    chooser.settle()  # validation runs on the chosen count
    assert torch.get_num_threads() == 1
    chooser.close()


def _finetune(split_pbmc, checkpoint, run_dir, **overrides):
    from scgpt_protocol import load_model
    from scgpt_protocol.adapt.train import finetune
    from scgpt_protocol.core.layout import RunLayout
    from scgpt_protocol.core.params import FinetuneParams

    categories = sorted(split_pbmc.obs["label"].unique())
    seen = []
    params = FinetuneParams(run_dir=str(run_dir), **{"batch_size": 16, "max_seq_len": 48, "lr": 1e-3, "patience": 0,
                                                     "epochs": 1, **overrides})
    model = load_model(checkpoint, n_classes=len(categories), device="cpu")
    finetune(model, split_pbmc, params, label_key="label", categories=categories, layout=RunLayout(run_dir),
             on_epoch_end=lambda row: seen.append(torch.get_num_threads()))
    return seen


def test_finetune_gives_the_thread_count_back(split_pbmc, tiny_checkpoint, tmp_path, two_threads):
    assert _finetune(split_pbmc, tiny_checkpoint, tmp_path, threads=1) == [1]
    assert torch.get_num_threads() == two_threads
    # also when it fails before its first epoch: here a resume refused (the saved state has another lr)
    with pytest.raises(ValueError, match="resume would mix them"):
        _finetune(split_pbmc, tiny_checkpoint, tmp_path, threads=1, epochs=2, lr=1e-2)
    assert torch.get_num_threads() == two_threads


@pytest.mark.parametrize("bad", [0, -2, "fast", True, 1.5])
def test_a_bad_thread_count_is_refused(bad, tmp_path):
    from scgpt_protocol.core.params import FinetuneParams, ParamsError

    with pytest.raises(ParamsError, match=r"parameter threads=.* is invalid: expected .*(int|threads)"):
        FinetuneParams(run_dir=str(tmp_path), threads=bad)
    assert FinetuneParams(run_dir=str(tmp_path), threads="auto").threads == "auto"
