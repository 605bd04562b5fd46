"""Schedule policies: one definition of turn order, turn ends, step counts and rounds, read by runner and server."""

from splittune.schedules.policy import POLICIES, policy_for
from splittune.schedules.sampling import Roster


def test_turn_orders():
    assert POLICIES["sfl-v2"].turn_order(Roster(2), 2, 1) == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert POLICIES["sequential"].turn_order(Roster(2), 4, 2) == [(0, 1), (0, 2), (1, 1), (1, 2), (0, 3), (0, 4), (1, 3), (1, 4)]
    assert POLICIES["sfl-v1"].turn_order(Roster(3), 5, 1) == []  # in parallel, batched
    assert POLICIES["sequential"].turn_order(Roster(1), 4, 2) == []  # one client has no one to wait for
    sampled = Roster(4, 2, seed=3)  # only each round's drawn clients take turns
    assert POLICIES["sfl-v2"].turn_order(sampled, 4, 2) == [(c, t) for t in range(1, 5) for c in sampled.at(t, 2)]
    assert POLICIES["sequential"].turn_order(sampled, 4, 2) == [(c, t) for r, span in ((1, (1, 2)), (2, (3, 4)))
                                                                for c in sampled.of(r) for t in span]


def test_step_counts_and_roles():
    seq, v1, v2 = POLICIES["sequential"], POLICIES["sfl-v1"], POLICIES["sfl-v2"]
    assert (seq.client_steps(10, 3), seq.server_steps(10, 3)) == (30, 30)  # one relayed schedule; one shared adapter
    assert (v1.client_steps(10, 3), v1.server_steps(10, 3)) == (10, 10)  # one adapter per client
    assert (v2.client_steps(10, 3), v2.server_steps(10, 3)) == (10, 30)
    assert v1.batched(3) and not v1.batched(1) and not v2.batched(3)
    assert seq.turn_ends(4, 5, 2) and seq.turn_ends(5, 5, 2) and not seq.turn_ends(3, 5, 2)
    assert not v2.turn_ends(2, 5, 2)
    assert not POLICIES["federated"].server_part and not POLICIES["centralized"].server_part
    assert policy_for("split", "sfl-v1") is v1 and policy_for("federated", "sfl-v1") is POLICIES["federated"]


def test_rounds_resume_after_the_last_completed_step():
    v2 = POLICIES["sfl-v2"]
    rounds = v2.rounds(Roster(2), 4, 2, start=1)
    assert [(r.turns, r.sync) for r in rounds] == [
        ([(0, [2]), (1, [2])], "aggregate"), ([(0, [3]), (1, [3])], None), ([(0, [4]), (1, [4])], "aggregate")]
    seq = POLICIES["sequential"].rounds(Roster(2), 5, 2, start=2)
    assert [(r.turns, r.concurrent, r.sync) for r in seq] == [
        ([(0, [3, 4]), (1, [3, 4])], False, "relay"), ([(0, [5]), (1, [5])], False, "relay")]
    assert [r.sync for r in POLICIES["centralized"].rounds(Roster(1), 2, 1)] == [None, None]
    sampled = Roster(5, 2, seed=1)
    assert [[c for c, _ in r.turns] for r in v2.rounds(sampled, 4, 2, start=1)] == [sampled.of(1), sampled.of(2), sampled.of(2)]
