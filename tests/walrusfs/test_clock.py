"""StampClock: the mount's timestamps against the kernel's (the mount test is in
test_fuse_mount)."""

from __future__ import annotations

import time

from walrusfs.clock import StampClock


class Clocks:
    def __init__(self, coarse: int, fine: int) -> None:
        self.coarse, self.fine = coarse, fine

    def stamp_clock(self) -> StampClock:
        return StampClock(lambda: self.coarse, lambda: self.fine)


def test_stamps_follow_the_coarse_clock_raised_to_the_kernels_last_ctime() -> None:
    c = Clocks(coarse=1_000, fine=1_900)
    clock = c.stamp_clock()
    assert clock() == 1_000  # not the fine clock: the kernel's next stamp may be below it
    clock.kernel_stamped(1_500)
    assert clock() == 1_500
    clock.kernel_stamped(1_200)  # an older ctime (another file's) lowers nothing
    assert clock() == 1_500
    c.coarse = 2_000
    assert clock() == 2_000


def test_a_ctime_ahead_of_the_fine_clock_is_not_the_kernels_and_is_ignored() -> None:
    c = Clocks(coarse=1_000, fine=1_900)
    clock = c.stamp_clock()
    clock.kernel_stamped(5_000)
    assert clock() == 1_000


def test_stamps_follow_the_wall_clock_when_it_is_set_back() -> None:
    c = Clocks(coarse=10_000, fine=10_100)
    clock = c.stamp_clock()
    clock.kernel_stamped(10_050)
    c.coarse, c.fine = 3_000, 3_100  # an administrator set the clock back
    assert clock() == 3_000
    c.coarse, c.fine = 10_000, 10_100  # and the noted stamp does not come back either
    assert clock() == 10_000


def test_the_default_clocks_are_the_wall_clock() -> None:
    before = time.time_ns()
    stamp = StampClock()()
    # The coarse clock lags the fine one by up to a tick or so; it never leads it.
    assert before - 1_000_000_000 < stamp <= time.time_ns()
