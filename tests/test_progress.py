"""StepTimer inside a measurement: steps and the time left, estimated from the work done since the first step."""

from longrope_convert.progress import StepTimer, duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_time_left_follows_the_work_done_after_the_first_step():
    """Two 4k documents reused (no work), then 16k ones at 10 s each: the loading before the first step and the
    reused steps do not make the estimate optimistic."""
    clock = Clock()
    progress = StepTimer([0, 0, 16384, 16384, 16384, 16384], clock=clock)
    clock.now = 300.0  # the model loads
    assert progress.line("eval", "document forwards") == "eval: 0/6 document forwards done"
    progress.step()
    progress.step()
    assert progress.time_left() == ""  # nothing measured yet
    for step in (3, 4):
        clock.now += 10
        progress.step()
    assert progress.done == 4 and progress.seconds_left() == 10 / 16384 * 2 * 16384
    assert progress.line("eval", "document forwards") == "eval: 4/6 document forwards done, about 20 s left"
    progress.step()
    progress.step()
    assert progress.time_left() == "about 0 s left"


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600 + 5 * 60 + 20)] == [
        "0 s", "59 s", "1 min 01 s", "59 min 59 s", "1 h 05 min"]
