"""The server's waiting places when a client vanishes: every client still present gets through.

Each test makes the race that a loaded machine makes by chance (two waiters timing out together) certain
with a slow step, and has a twin showing that a missing client with no give-up is still an error.
"""

import threading
import time

import pytest

from splittune.parties.server.meet import Rendezvous, Turnstile, WaitTimeout


def _run(targets):
    results, errors = {}, {}

    def go(i, fn):
        try:
            results[i] = fn()
        except Exception as err:  # noqa: BLE001
            errors[i] = err

    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(targets)]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.1 * (i > 0))  # the second waiter times out while the first, having given up, computes
    for t in threads:
        t.join(10)
    return results, errors


def test_both_waiters_of_a_round_get_the_result_when_one_gives_up_on_the_missing_client():
    meet, gone = Rendezvous(0.3), []

    def compute(items):
        time.sleep(0.8)  # longer than the time limit: the other waiter's limit runs out during it
        return {c: sum(items.values()) for c in items}

    def client(i):
        return lambda: meet.meet("round", i, i + 1, {0, 1, 2}, compute, give_up=gone.extend)

    results, errors = _run([client(0), client(1)])
    assert not errors, errors
    assert results == {0: 3, 1: 3}
    assert gone == [2]


def test_a_round_without_give_up_still_fails_for_the_missing_client():
    meet = Rendezvous(0.2)
    with pytest.raises(WaitTimeout, match=r"still lacks clients \[1\]"):
        meet.meet("round", 0, 1, {0, 1}, lambda items: items)


def test_a_turn_that_moved_on_during_the_wait_is_waited_for_again():
    turns, gone = Turnstile([(0, 1), (1, 1), (2, 1)], 0.3), []

    def late():  # client 1 takes its turn just as client 2's limit is near, and ends it later
        time.sleep(0.25)
        turns.skip(0)
        turns.enter(1, 1)
        time.sleep(0.2)
        turns.advance(1, 1)
        return "served"

    results, errors = _run([lambda: turns.enter(2, 1, give_up=gone.append) or "entered", late])
    assert not errors, errors
    assert results == {0: "entered", 1: "served"}
    assert gone == []  # client 1 was slow, not gone: nobody was given up


def test_a_turn_that_never_moves_gives_its_holder_up():
    turns, gone = Turnstile([(0, 1), (1, 1)], 0.2), []
    turns.enter(1, 1, give_up=gone.append)
    assert gone == [0]
