"""`LoginThrottle`: wrong passwords per username and per address, blocks that grow, bounded memory."""

from __future__ import annotations

from plugins.device_auth import throttle
from plugins.device_auth.throttle import FIRST_BLOCK_S, MAX_BLOCK_S, MAX_FAILURES, WINDOW_S, LoginThrottle

A, B = "192.0.2.1", "192.0.2.2"


def fail(t: LoginThrottle, address: str, username: str, now: float, times: int) -> list[throttle.Block]:
    blocks = []
    for _ in range(times):
        blocks += t.failed(address, username, now)
    return blocks


def test_a_username_is_blocked_after_a_few_failures_and_only_it() -> None:
    """MAX_FAILURES wrong passwords for one account block that account from anywhere, not others nor the address."""
    t = LoginThrottle()
    assert fail(t, A, "dash", 0.0, MAX_FAILURES - 1) == []
    assert not t.refused(A, "dash", 1.0)
    [block] = fail(t, A, "dash", 1.0, 1)
    assert (block.kind, block.key, block.seconds) == ("username", "dash", FIRST_BLOCK_S)
    assert t.refused(A, "dash", 2.0) and t.refused(B, "dash", 2.0)
    assert not t.refused(A, "ops", 2.0), "another account from the same address is not held up"
    assert not t.refused(A, "dash", 1.0 + FIRST_BLOCK_S), "the block ends"


def test_failures_outside_the_window_do_not_add_up() -> None:
    """Failures spread wider than WINDOW_S never block."""
    t = LoginThrottle()
    for i in range(3 * MAX_FAILURES):
        assert t.failed(A, "dash", i * (WINDOW_S / (MAX_FAILURES - 1) + 1)) == []


def test_each_block_of_the_same_key_doubles_up_to_the_maximum() -> None:
    """Repeated bursts: the block doubles each time, capped at MAX_BLOCK_S; refused attempts are reported."""
    t, now, seen = LoginThrottle(), 0.0, []
    for _ in range(12):
        blocks = fail(t, A, "dash", now, MAX_FAILURES)
        seen.append(blocks[0].seconds)
        assert t.refused(A, "dash", now + 0.5)
        now += blocks[0].seconds
    assert seen[:3] == [FIRST_BLOCK_S, 2 * FIRST_BLOCK_S, 4 * FIRST_BLOCK_S]
    assert seen[-1] == MAX_BLOCK_S and max(seen) == MAX_BLOCK_S
    assert fail(t, A, "dash", now, MAX_FAILURES)[0].refused_before == 1


def test_a_right_password_forgets_the_usernames_failures() -> None:
    """After a success, the account's earlier failures no longer count."""
    t = LoginThrottle()
    fail(t, A, "dash", 0.0, MAX_FAILURES - 1)
    t.succeeded("dash")
    assert fail(t, A, "dash", 1.0, MAX_FAILURES - 1) == []


def test_an_address_spraying_many_usernames_is_blocked() -> None:
    """Wrong passwords for MAX_FAILURES different accounts from one address block the address, for any account."""
    t = LoginThrottle()
    blocks = [b for i in range(MAX_FAILURES) for b in t.failed(A, f"user{i}", 0.0)]
    assert [(b.kind, b.key) for b in blocks] == [("address", A)]
    assert t.refused(A, "fresh", 1.0)
    assert not t.refused(B, "fresh", 1.0)


def test_memory_is_bounded() -> None:
    """A flood of addresses keeps at most MAX_KEYS records."""
    t = LoginThrottle()
    for i in range(throttle.MAX_KEYS + 500):
        t.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "dash", float(i))
    assert len(t) <= throttle.MAX_KEYS
