"""What the operator page keeps of the service's traffic (``deploy/dashboard.py``'s ``Watch``): a session from its
accepted hello to its end, counted by what crossed; refusals by status; nothing from a refused hello."""

from splittune.deploy.dashboard import Watch

HELLO = {"client": 1, "clients": 2, "run_id": "run-abc", "schedule": "sfl-v2", "model": "tiny:llama", "steps": 8,
         "defenses": [{"name": "gaussian", "sigma": 0.5, "seed": 1234}], "secure_aggregation": False}


def test_a_session_is_kept_from_its_hello_to_its_end():
    watch = Watch()
    watch.message("s1", "hello", 0, 100, False, "alice", HELLO)
    watch.message("s1", "activations", 3, 1000, False, "alice", {})
    watch.message("s1", "step", 3, 10, True, "alice", {})
    watch.sent("s1", 500)
    [entry], ended, _, _ = watch.copy()
    assert (entry["client_id"], entry["client"], entry["run"], entry["step"]) == ("alice", 1, "run-abc", 3)
    assert (entry["bytes_in"], entry["bytes_out"], entry["messages"], entry["errors"]) == (1110, 500, 3, 1)
    assert entry["defenses"] == [{"name": "gaussian", "sigma": 0.5}] and ended == []  # announced, without its seed
    watch.disconnected(["s1"])
    sessions, ended, _, _ = watch.copy()
    assert sessions == [] and [e["session"] for e in ended] == ["s1"]


def test_a_refused_hello_leaves_nothing_and_refusals_count_by_status():
    watch = Watch()
    watch.message("s2", "hello", 0, 100, True, "mallory", HELLO)  # refused
    watch.message("s2", "activations", 1, 100, False, "mallory", {})  # (a session it never opened)
    assert watch.copy()[0] == []
    watch.message("s3", "hello", 0, 100, False, "bob", {"inference": True})  # the twin: accepted
    watch.message("s3", "close", 0, 10, False, "bob", {})  # an inference session ends on a stream that stays open
    assert [e["session"] for e in watch.copy()[1]] == ["s3"]
    watch.refused(None, "bad token")
    watch.refused("RESOURCE_EXHAUSTED", "the server holds its maximum of 64 sessions")
    watch.refused(None, "no token")
    _, _, counts, last = watch.copy()
    assert counts == {"UNAUTHENTICATED": 2, "RESOURCE_EXHAUSTED": 1} and last["UNAUTHENTICATED"]["reason"] == "no token"
