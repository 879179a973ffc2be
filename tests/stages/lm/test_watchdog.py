"""The stall rule over worker heartbeats (stages/lm/watchdog.py StallJudge), on made-up snapshots."""

from __future__ import annotations

from stages.lm.train_config import HealthConfig
from stages.lm.watchdog import StallJudge

HEALTH = HealthConfig(stall_factor=5, stall_min_s=10, on_stall="fail")


def _beat(step: int, at: float, pid: int = 100, start: int = 0, median: float | None = 1.0) -> dict:
    return {"step": step, "start": start, "median_step_s": median, "pid": pid, "node": "n", "at": at}


def test_a_silent_rank_is_named_once_after_the_limit():
    judge = StallJudge(HEALTH, "pretrain")
    assert judge.check({0: _beat(3, 0.0), 1: _beat(3, 0.0, pid=101)}, 0.0) == []
    # rank 1 froze after step 3 (no more beats); rank 0 waits in a collective and keeps beating
    assert judge.check({0: _beat(3, 9.0), 1: _beat(3, 0.0, pid=101)}, 9.0) == []
    [(rank, beat, msg)] = judge.check({0: _beat(3, 11.0), 1: _beat(3, 0.0, pid=101)}, 11.0)
    assert rank == 1 and beat["pid"] == 101
    assert "rank 1 (pid 101) sent no heartbeat for 11 s after step 3" in msg and "killing it" in msg
    assert judge.check({0: _beat(3, 20.0), 1: _beat(3, 0.0, pid=101)}, 20.0) == []  # reported once


def test_ranks_beating_without_a_step_are_stuck_after_the_limit():
    judge = StallJudge(HEALTH.model_copy(update={"on_stall": "warn"}), "sft")
    judge.check({0: _beat(5, 0.0), 1: _beat(5, 0.0, pid=101)}, 0.0)
    stalls = judge.check({0: _beat(5, 12.0), 1: _beat(5, 12.0, pid=101)}, 12.0)
    assert [r for r, _, _ in stalls] == [0, 1]
    assert "made no step for 12 s after step 5" in stalls[0][2] and "killing" not in stalls[0][2]


def test_the_limit_follows_the_median_step_time():
    judge = StallJudge(HEALTH, "pretrain")
    slow = {0: _beat(2, 0.0, median=4.0)}  # 5 x 4 s = 20 s
    judge.check(slow, 0.0)
    assert judge.check({0: _beat(2, 0.0, median=4.0)}, 15.0) == []
    assert len(judge.check({0: _beat(2, 0.0, median=4.0)}, 21.0)) == 1


def test_start_up_and_a_restarted_process_are_not_stalls():
    judge = StallJudge(HEALTH, "pretrain")
    # a process that resumed at step 4 and has not made a step yet (loading a checkpoint)
    assert judge.check({0: _beat(4, 0.0, start=4, median=None)}, 100.0) == []
    assert judge.check({0: _beat(0, 0.0, median=None)}, 100.0) == []
