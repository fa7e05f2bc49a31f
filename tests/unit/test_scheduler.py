"""Scheduler and engine loop with a fake model: budgets, chunked prefill, slots, aborts."""

from __future__ import annotations

import torch

from app.engine.scheduler import Scheduler
from app.engine.sequence import Sequence, SequenceStatus
from app.engine.types import Delta, FinishReason, SamplingParams, StepStats
from app.engine.worker import Abort, EngineCore, NewRequest, Stop
from app.models.base import StepInput

V = 50


class FakeRunner:
    """Next token = (last fed token + 1) % V; records every step's inputs."""

    def __init__(self, max_num_seqs: int = 4, max_model_len: int = 256) -> None:
        self.vocab_size = V
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.steps: list[list[StepInput]] = []
        self.cache: dict[int, int] = {}  # seq_id -> tokens held
        self.freed: list[int] = []

    def step(self, inputs: list[StepInput]) -> torch.Tensor:
        self.steps.append(inputs)
        logits = torch.full((len(inputs), V), -10.0)
        for row, inp in enumerate(inputs):
            assert self.cache.get(inp.seq_id, 0) == inp.start_pos, "fed out of order"
            self.cache[inp.seq_id] = inp.start_pos + len(inp.token_ids)
            logits[row, (inp.token_ids[-1] + 1) % V] = 10.0
        return logits

    def free(self, seq_id: int) -> None:
        self.cache.pop(seq_id, None)
        self.freed.append(seq_id)


class FakeTokenizer:
    """Detokenizer-compatible: token i decodes to chr(ord('a') + i % 26)."""

    class _Backend:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    backend_tokenizer = _Backend()

    def decode(self, ids, skip_special_tokens=True):
        return self._Backend().decode(ids)


def make_core(runner: FakeRunner, budget: int = 16) -> tuple[EngineCore, list[tuple[str, Delta | str]]]:
    """An engine on the fake runner; its outputs go to the returned list, its StepStats to `core.stats_log`."""
    out: list[tuple[str, Delta | str]] = []
    stats_log: list[StepStats] = []

    def emit(batch, stats):
        out.extend(batch)
        stats_log.append(stats)

    core = EngineCore(runner, FakeTokenizer(), eos_token_ids=[49], emit_batch=emit,
                      max_num_batched_tokens=budget)
    core.stats_log = stats_log
    return core, out


def run_until_idle(core: EngineCore, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        core._drain_inbox(block=False)
        if not core.scheduler.has_work:
            return
        core.step()
    raise AssertionError("engine did not go idle")


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def texts(out) -> dict[str, str]:
    res: dict[str, str] = {}
    for rid, d in out:
        res[rid] = res.get(rid, "") + d.text
    return res


def test_long_prompt_is_chunked_while_running_streams_keep_decoding():
    runner = FakeRunner(max_num_seqs=4)
    core, out = make_core(runner, budget=8)
    core.inbox.put(NewRequest("short", [1, 2], greedy(30)))
    core._drain_inbox(block=False)
    core.step()  # prefill of "short" + first token
    core.inbox.put(NewRequest("long", list(range(40)), greedy(2)))
    core._drain_inbox(block=False)
    per_step_tokens = []
    while core.scheduler.has_work:
        core.step()
        per_step_tokens.append([len(i.token_ids) for i in runner.steps[-1]])
        if len(per_step_tokens) > 100:
            break
    # every step while "long" prefills: "short" decodes one token and the chunk fills the rest of the budget
    assert per_step_tokens[0] == [1, 7] and per_step_tokens[1] == [1, 7]
    assert all(sum(s) <= 8 for s in per_step_tokens)
    short_deltas = [d for rid, d in out if rid == "short"]
    assert len(short_deltas) == 30 and short_deltas[-1].finish_reason is FinishReason.LENGTH
    long_deltas = [d for rid, d in out if rid == "long"]
    assert [d.token_ids for d in long_deltas] == [[40 % V], [41 % V]]  # sampled only after the full prompt


def test_waits_for_a_free_slot_then_reuses_it():
    runner = FakeRunner(max_num_seqs=2)
    core, out = make_core(runner, budget=64)
    for i in range(5):
        core.inbox.put(NewRequest(f"r{i}", [i, i + 1], greedy(3)))
    run_until_idle(core)
    assert max(len(s) for s in runner.steps) <= 2
    assert sorted(runner.freed) == list(range(5))
    assert runner.cache == {}
    assert all(out_d.finish_reason is FinishReason.LENGTH for _, out_d in out if out_d.is_finished)
    assert texts(out) == {f"r{i}": "".join(chr(ord('a') + (i + 2 + k) % 26) for k in range(3)) for i in range(5)}


def test_abort_waiting_and_running_frees_everything():
    runner = FakeRunner(max_num_seqs=1)
    core, out = make_core(runner)
    core.inbox.put(NewRequest("a", [1], greedy(100)))
    core.inbox.put(NewRequest("b", [2], greedy(100)))
    core._drain_inbox(block=False)
    core.step()
    core.inbox.put(Abort("a"))
    core.inbox.put(Abort("b"))
    core.inbox.put(Abort("unknown"))
    core._drain_inbox(block=False)
    assert not core.scheduler.has_work and core.num_unfinished == 0
    assert runner.cache == {}
    # the stats after the aborts show an empty engine and both sequences finished as aborted
    last = core.stats_log[-1]
    assert (last.num_running, last.num_waiting, last.kv_usage) == (0, 0, 0.0)
    finished = {f.finish_reason: f for s in core.stats_log for f in s.finished}
    assert [f.finish_reason for s in core.stats_log for f in s.finished] == [FinishReason.ABORT] * 2
    assert finished[FinishReason.ABORT].num_output_tokens in (0, 1)


def test_step_stats_report_batches_tokens_and_timings():
    runner = FakeRunner(max_num_seqs=2)
    core, out = make_core(runner, budget=64)
    for i in range(3):
        core.inbox.put(NewRequest(f"r{i}", [1, 2, 3, 4], greedy(5)))
    run_until_idle(core)
    steps = [s for s in core.stats_log if s.batch_size]
    assert len(steps) == len(runner.steps)
    assert [s.batch_size for s in steps] == [len(x) for x in runner.steps]
    assert [s.num_batched_tokens for s in steps] == [sum(len(i.token_ids) for i in x) for x in runner.steps]
    assert sum(s.num_prompt_tokens for s in steps) == 3 * 4
    assert sum(s.num_generation_tokens for s in steps) == 3 * 5
    assert len([v for s in steps for v in s.inter_token_s]) == 3 * 4  # every token after the first
    assert steps[0].num_running == 2 and steps[0].num_waiting == 1  # the third waits for a slot
    fin = [f for s in core.stats_log for f in s.finished]
    assert [f.finish_reason for f in fin] == [FinishReason.LENGTH] * 3
    assert all(f.num_prompt_tokens == 4 and f.num_output_tokens == 5 for f in fin)
    assert all(f.queue_s >= 0 and f.prefill_s >= 0 and f.decode_s >= 0 for f in fin)
    assert core.stats_log[-1].num_running == 0 and core.stats_log[-1].num_waiting == 0


def test_stop_rules():
    runner = FakeRunner()
    core, out = make_core(runner)
    core.inbox.put(NewRequest("eos", [46], greedy(10)))  # 47, 48, 49 = eos
    core.inbox.put(NewRequest("ignore", [46], greedy(5, ignore_eos=True)))
    core.inbox.put(NewRequest("stopid", [1], greedy(10, stop_token_ids=(4,))))
    core.inbox.put(NewRequest("minimum", [46], greedy(10, min_tokens=5, stop_token_ids=(48,))))
    core.inbox.put(NewRequest("stopstr", [0], greedy(10, stop=("de",))))  # b c d e ...
    run_until_idle(core)
    final = {rid: d for rid, d in out if d.is_finished}
    assert final["eos"].num_output_tokens == 3 and final["eos"].finish_reason is FinishReason.STOP
    assert final["ignore"].num_output_tokens == 5 and final["ignore"].finish_reason is FinishReason.LENGTH
    assert final["stopid"].num_output_tokens == 3
    assert final["minimum"].num_output_tokens >= 5
    t = texts(out)
    assert t["eos"] == "vw" and t["stopstr"] == "bc" and final["stopstr"].finish_reason is FinishReason.STOP


def test_failing_sequence_creation_reports_error_not_crash():
    runner = FakeRunner()
    core, out = make_core(runner)
    core.inbox.put(NewRequest("bad", [1], SamplingParams(max_tokens=2, temperature="hot")))  # type: ignore[arg-type]
    core.inbox.put(NewRequest("good", [1], greedy(2)))
    run_until_idle(core)
    assert [type(d) for r, d in out if r == "bad"] == [str]  # an error message for that request only
    assert texts([(r, d) for r, d in out if r == "good"]) == {"good": "cd"}
    assert core.num_unfinished == 0 and runner.cache == {}


def test_scheduler_budget_is_at_least_one_token_per_running_sequence():
    s = Scheduler(max_num_seqs=4, max_num_batched_tokens=4)
    seqs = []
    for i in range(4):
        seq = Sequence(i, f"r{i}", [1, 2, 3], greedy(5), sampling=None, detokenizer=None)  # type: ignore[arg-type]
        s.add(seq)
        seqs.append(seq)
    first = s.schedule()
    assert [c.num_tokens for c in first] == [3, 1]  # budget 4 splits across newcomers
    assert all(seq.status is SequenceStatus.RUNNING for seq in seqs[:2])


def test_engine_calls_on_idle_once_after_each_burst_of_work():
    """The worker gives the allocator's free pages back when it goes idle: once per burst of work, not at
    start and not again while it stays idle."""
    import threading

    runner = FakeRunner()
    core, out = make_core(runner)
    calls: list[int] = []
    idle = threading.Semaphore(0)

    def on_idle() -> None:
        calls.append(len(runner.steps))
        idle.release()

    core.on_idle, core.idle_after_s = on_idle, 0.01
    loop = threading.Thread(target=core.run_forever)
    loop.start()
    try:
        for i in range(2):
            core.inbox.put(NewRequest(f"r{i}", [1, 2, 3], greedy(5)))
            assert idle.acquire(timeout=30), "on_idle was not called after the work"
    finally:
        core.inbox.put(Stop())
        loop.join(30)
    assert texts(out) == {"r0": "efghi", "r1": "efghi"}
    assert len(calls) == 2 and 0 < calls[0] < calls[1] == len(runner.steps)


def test_a_failing_on_idle_does_not_stop_the_engine():
    import threading

    runner = FakeRunner()
    core, out = make_core(runner)
    failures = threading.Semaphore(0)

    def on_idle() -> None:
        failures.release()
        raise OSError("no malloc_trim here")

    core.on_idle, core.idle_after_s = on_idle, 0.01
    loop = threading.Thread(target=core.run_forever)
    loop.start()
    try:
        for rid, first in (("a", 1), ("b", 7)):
            core.inbox.put(NewRequest(rid, [first], greedy(2)))
            assert failures.acquire(timeout=30)
    finally:
        core.inbox.put(Stop())
        loop.join(30)
    assert texts(out) == {"a": "cd", "b": "ij"}


def test_a_held_sequence_keeps_its_place_while_later_ones_run():
    held: set[int] = {0}
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, hold=lambda seq: seq.seq_id in held)
    seqs = [Sequence(i, f"r{i}", [1] * 10, SamplingParams(), sampling=None, detokenizer=None) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    chunks = sched.schedule()
    assert [c.seq.seq_id for c in chunks] == [1, 2]  # 0 waits, the others go first
    assert list(sched.waiting) == [seqs[0]] and seqs[0].status is SequenceStatus.WAITING
    held.clear()
    assert [c.seq.seq_id for c in sched.schedule() if c.seq.seq_id == 0] == [0]
    assert not sched.waiting

    # a held sequence keeps a slot too: later ones take only what is left
    held.add(10)
    small = Scheduler(max_num_seqs=2, max_num_batched_tokens=64, hold=lambda seq: seq.seq_id in held)
    for i in (10, 11, 12):
        small.add(Sequence(i, f"r{i}", [1] * 10, SamplingParams(), sampling=None, detokenizer=None))
    assert [c.seq.seq_id for c in small.schedule()] == [11]
    held.clear()
    small.schedule()
    assert [s.seq_id for s in small.running] == [11, 10]  # 10 took the slot it kept; 12 still waits
    assert [s.seq_id for s in small.waiting] == [12]
