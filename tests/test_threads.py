"""The thread count of decoding steps (propd.threads.ThreadTuner): chosen by measured step times, never changing the
output."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd.errors import PropdError
from propd.threads import ThreadTuner


class FakeThreads:
    """torch's thread setting, recorded."""

    def __init__(self, n: int):
        self.n, self.calls = n, []

    def get(self) -> int:
        return self.n

    def set(self, n: int) -> None:
        self.n = n
        self.calls.append(n)


def run(tuner: ThreadTuner, threads: FakeThreads, cost: dict[int, float], steps: int, kind=(1, 1)) -> list[int]:
    """``steps`` steps whose time is ``cost[thread count]``; the counts they ran with."""
    used = []
    for _ in range(steps):
        tuner.begin(kind)
        used.append(threads.n)
        tuner.end(kind, cost[threads.n])
    return used


def make(n: int, **kw) -> tuple[ThreadTuner, FakeThreads]:
    threads = FakeThreads(n)
    tuner = ThreadTuner(set_threads=threads.set, get_threads=threads.get, **kw)
    tuner.start()
    return tuner, threads


def test_moves_to_fewer_threads_when_they_are_faster_and_back_when_the_machine_frees():
    tuner, threads = make(4, probe_every=5, probe_steps=2)
    busy = {4: 0.020, 2: 0.012, 1: 0.015}  # another process holds cores: 2 threads are fastest
    used = run(tuner, threads, busy, 60)
    assert used[:5] == [4] * 5 and tuner.current == 2 and used[-1] == 2
    quiet = {4: 0.006, 2: 0.010, 1: 0.018}
    run(tuner, threads, quiet, 200)
    assert tuner.current == 4
    tuner.restore()
    assert threads.n == 4


def test_prefill_runs_at_the_steps_count_once_they_moved_down():
    """Under contention a prefill's parallel regions stall as a step's do: once the steps moved below the process's
    count, a prefill takes theirs; before that, and on a quiet machine, the process's; a fixed count always."""
    tuner, threads = make(4, probe_every=5, probe_steps=2)
    tuner.for_prefill()
    assert threads.n == 4
    run(tuner, threads, {4: 0.020, 2: 0.012, 1: 0.015}, 30)
    assert tuner.current == 2
    tuner.for_prefill()
    assert threads.n == 2
    run(tuner, threads, {4: 0.006, 2: 0.010, 1: 0.018}, 200)
    assert tuner.current == 4
    tuner.for_prefill()
    assert threads.n == 4
    fixed, fthreads = make(4, fixed=1)
    fixed.for_prefill()
    assert fthreads.n == 1


def test_a_quiet_machine_costs_one_probe():
    tuner, threads = make(2, probe_every=4, probe_steps=3)
    used = run(tuner, threads, {2: 0.007, 1: 0.009}, 400)
    assert tuner.current == 2 and tuner.switches == 0
    assert tuner.probes == 1 and used.count(1) == 3


def test_a_probe_step_far_slower_ends_the_probe_at_once():
    """A probe whose first step takes ``give_up`` (1.5) times the current count's median stops there: one slow
    step, not ``probe_steps``; the count stays, and later probes for more threads stop as early."""
    tuner, threads = make(2, probe_every=4, probe_steps=3)
    used = run(tuner, threads, {2: 0.007, 1: 0.011}, 400)  # half the threads: 1.57x slower
    assert tuner.current == 2 and tuner.probes == 1 and used.count(1) == 1
    tuner, threads = make(2, probe_every=4, probe_steps=3)
    run(tuner, threads, {2: 0.030, 1: 0.011}, 40)  # a busy machine: 1 thread is faster
    assert tuner.current == 1
    used = run(tuner, threads, {2: 0.030, 1: 0.011}, 400)
    ups = [i for i in range(1, len(used)) if used[i] == 2 and used[i - 1] == 1]
    assert ups and all(used[i + 1] == 1 for i in ups if i + 1 < len(used))  # each probe up: a single step


def test_contention_that_starts_later_is_noticed_and_its_end_too():
    tuner, threads = make(2, probe_every=4, probe_steps=3)
    run(tuner, threads, {2: 0.007, 1: 0.011}, 50)
    assert tuner.current == 2
    run(tuner, threads, {2: 0.016, 1: 0.011}, 30)  # another process takes a core: 2 threads now wait at barriers
    assert tuner.current == 1
    used = run(tuner, threads, {2: 0.007, 1: 0.011}, 200)  # it is gone again
    assert tuner.current == 2 and used[-1] == 2
    probes_up = [i for i in range(1, len(used)) if used[i] == 2 and used[i - 1] == 1]
    assert probes_up  # found by probing, not by chance


def test_fixed_count_never_probes_and_kinds_are_compared_apart():
    tuner, threads = make(2, fixed=1)
    assert set(run(tuner, threads, {1: 0.01, 2: 0.001}, 100)) == {1}
    tuner.restore()
    assert threads.n == 2
    tuner, threads = make(2, probe_every=3, probe_steps=2)
    # a big tree step is slow at any count: alone it must not make the small steps' count look bad
    for _ in range(30):
        run(tuner, threads, {2: 0.005, 1: 0.008}, 1, kind=(1, 1))
        run(tuner, threads, {2: 0.050, 1: 0.080}, 1, kind=(1, 64))
    assert tuner.current == 2 and tuner.switches == 0


def test_a_changed_process_setting_starts_over():
    tuner, threads = make(4, probe_every=2, probe_steps=1)
    run(tuner, threads, {4: 0.02, 2: 0.01, 1: 0.02}, 20)
    assert tuner.current == 2
    tuner.restore()
    threads.n = 1  # the user set one thread
    tuner.start()
    assert set(run(tuner, threads, {1: 0.01, 2: 0.001, 4: 0.001}, 50)) == {1}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 40), preset=st.sampled_from(["ar", "medusa", "propd"]),
       lens=st.lists(st.integers(1, 20), min_size=1, max_size=3))
def test_switching_thread_counts_every_step_keeps_the_output(seed, preset, lens):
    """A tuner that changes the thread count at nearly every step (every probe wins) gives ``ar``'s tokens with the
    threads left alone; the process's count is back afterwards."""
    from propd import Decoder
    from propd.testing import random_prompts, tiny_model

    model = tiny_model(seed=seed % 5, heads=4, early=(1, 2))
    prompts = random_prompts(model, seed, lens)
    want = Decoder(model, preset="ar", threads=None).generate_ids(prompts, max_new_tokens=16).token_ids
    before = torch.get_num_threads()
    dec = Decoder(model, preset=preset, threads=None)
    dec.threads = ThreadTuner(probe_every=1, probe_steps=1, margin=1e9, slow=0.0, window=1)
    res = dec.generate_ids(prompts, max_new_tokens=16)
    assert res.token_ids == want
    assert torch.get_num_threads() == before
    assert all(1 <= s.threads <= before for s in res.stats)  # each step records the count it ran with
    if before > 1:
        assert dec.threads.switches > 0
        assert len({s.threads for s in res.stats}) > 1


def test_bad_threads_argument_is_refused():
    from propd import Decoder
    from propd.testing import tiny_model

    with pytest.raises(PropdError, match="threads must be"):
        Decoder(tiny_model(seed=0), preset="ar", threads=0)


def test_a_step_is_compared_with_steps_of_its_own_tree_size():
    """The decoder tells the tuner each step's own kind (batch size, the sizer's budget for that step), so a sizer that
    mixes tree sizes never makes one kind's median drift (which would read as a slowdown and cost probes)."""
    from propd import Decoder
    from propd.testing import random_prompts, tiny_model

    class Spy(ThreadTuner):
        def __init__(self):
            super().__init__(fixed=1)
            self.kinds = []

        def end(self, kind, seconds):
            self.kinds.append(kind)
            super().end(kind, seconds)

    model = tiny_model(seed=1, heads=3)
    prompts = random_prompts(model, 2, [4, 7])

    class Alternate:  # 1-, 4- and 1-node steps in turn
        from propd.hookspecs import hookimpl

        @hookimpl
        def propd_tree(self, ctx):
            from propd.tree import DraftTree, tree_paths

            return DraftTree.from_paths(tree_paths("chain:3" if ctx.step % 3 == 1 else "chain:0"), device=ctx.device)

    dec = Decoder(model, preset=None, sizer=Alternate(), proposer="medusa", threads=None, entry_points=False)
    dec.threads = Spy()
    res = dec.generate_ids(prompts, max_new_tokens=12)
    assert dec.threads.kinds == [(s.batch_size, s.tree_nodes) for s in res.stats]
    assert {k[1] for k in dec.threads.kinds} == {1, 4}
