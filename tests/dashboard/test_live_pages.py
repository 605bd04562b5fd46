"""Both dashboards in a real browser while a run trains (issue 28): the run page (``splittune dashboard RUN_DIR``) and
the operator page (``serve --dashboard``) show the live step and the connected client after their scripts ran.

One served process in this process (tests/served.py's pattern) and one client run in a thread, held at a step: the
pages are read while the run is under way, then it finishes and the pages say so. One test, in that order: the parts
below are its chapters (a test worker may run tests of a file in any order)."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from splittune.channels.grpc import GrpcChannel
from splittune.config import load_config
from splittune.deploy.dashboard import OperatorPage, snapshot
from splittune.deploy.service import SplitService
from splittune.models.arch import detect_arch
from splittune.models.zoo import resolve_model
from splittune.parties.server.handler import Server
from splittune.run import train_remote
from splittune.schedules.policy import POLICIES
from splittune.taps.recording import Recording
from splittune.track.dashboard import RunView, serve
from splittune.wire import Message

from browser import dump_dom, text_of
from configs import tiny
from served import serve_here

TOKEN = "alice-token-0123456789abcdef"
RUN = tiny("cuts=[1,3]", "data.max_documents=6", "train.steps=4", "train.eval_every=2", "train.warmup_steps=0", "codec.up=int8",
           "defense=[{name: gaussian, sigma: 0.5, clip: 1.0}]")
HOLD_AT = 3  # the run waits inside this step's progress report: steps 1..2 are on disk, step 3 crossed the cut


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


@pytest.fixture
def live(tmp_path):
    """A server with its operator page, a client run held at step 3 with its run page; released at the end."""
    out = tmp_path / "run"
    source = resolve_model("tiny:llama")
    server = Server(source, detect_arch(source.config()), source.config(), wait_s=30, policies=POLICIES)
    service = SplitService(server, {"alice": TOKEN})
    recording = Recording(tmp_path / "tap", ("server",), 1 << 20, truth=False)  # serve --record-tap: the page shows its size
    recording.attach(server, service.link)
    grpc_server, port = serve_here(service)
    url = f"grpc://127.0.0.1:{port}"
    page = OperatorPage("127.0.0.1:0", None)
    page.attach(service, recording)
    held, release, result = threading.Event(), threading.Event(), {}

    def progress(done, total, row):
        if row.get("step") == HOLD_AT:
            held.set()
            release.wait(60)

    def client():
        try:
            result["summary"] = train_remote(load_config(None, RUN), out, 0, lambda i: GrpcChannel(url, "alice", TOKEN), progress)
        except BaseException as err:  # noqa: BLE001 (the test says what went wrong)
            result["error"] = err
            held.set()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    assert held.wait(60) and "error" not in result, result
    run_page = serve("127.0.0.1:0", "run.html", RunView(out).endpoints(), None)
    def finish() -> dict:
        release.set()
        thread.join(60)
        assert "summary" in result, result
        return result["summary"]

    yield {"service": service, "server_url": page.running.url, "run_url": run_page.url, "out": out, "grpc": url, "finish": finish}
    release.set()
    thread.join(60)
    run_page.stop()
    page.stop()
    grpc_server.stop(None)
    recording.close()


def test_both_pages_follow_a_run_in_a_browser(live):
    run_page_shows_the_live_step(live)
    operator_page_shows_the_connected_client(live)
    operator_endpoint_names_sessions_and_refusals_and_holds_no_secret(live)
    pages_follow_the_run_to_its_end(live)


def run_page_shows_the_live_step(live):
    on_disk = [json.loads(line) for line in (live["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in on_disk] == [1, 2]  # the page's truth: what the run has flushed
    with urllib.request.urlopen(live["run_url"], timeout=10) as reply:  # the twin: the page as served, before its scripts
        assert text_of(reply.read().decode(), "step") == "–"
    dom = dump_dom(live["run_url"])
    assert text_of(dom, "status") == "training"
    assert text_of(dom, "step") == "2" and text_of(dom, "steps") == "4"
    clients = text_of(dom, "clients")
    assert clients.startswith("client step steps taken") and " 0 2 2 " in f" {clients} ", clients
    assert text_of(dom, "loss") == f"{on_disk[-1]['loss']:.4f}"
    assert "<path" in text_of_raw(dom, "chart-loss") and "<rect" in text_of_raw(dom, "chart-time")  # charts were drawn
    evals = text_of(dom, "eval")
    assert evals != "–", "the evaluation at step 2 is live (evals.jsonl is written as each ends)"
    assert "gaussian" in text_of(dom, "privacy")


def text_of_raw(dom: str, element_id: str) -> str:
    start = dom.index(f'id="{element_id}"')
    return dom[start:dom.index("</section>", start)]


def operator_page_shows_the_connected_client(live):
    dom = dump_dom(live["server_url"])
    sessions = text_of(dom, "sessions")
    assert "alice" in sessions and f"{HOLD_AT} / 4" in sessions, sessions  # the client, at the step it is in
    assert "up: gaussian → padding → int8 · down: padding → raw" in sessions, sessions  # the agreed chain
    assert "gaussian" in sessions and "yes" in sessions  # its announced defense; connected
    assert text_of(dom, "session-count") == "1"
    assert text_of(dom, "tap").startswith("observer recorded cap records dropped server ")
    assert TOKEN not in dom


def operator_endpoint_names_sessions_and_refusals_and_holds_no_secret(live):
    before = get(live["server_url"] + "api/server")
    assert before["refused_by_reason"] == []  # the twin of the count below
    with pytest.raises(Exception):
        GrpcChannel(live["grpc"], "mallory", "not-the-token-0123456789").call(Message("hello", "s-mallory", meta={}))
    state = get(live["server_url"] + "api/server")
    assert [(r["code"], r["count"]) for r in state["refused_by_reason"]] == [("UNAUTHENTICATED", 1)]
    [session] = state["sessions"]
    assert session["client_id"] == "alice" and session["client"] == 0 and session["step"] == HOLD_AT and session["connected"]
    assert session["bytes_in"] > 0 and session["bytes_out"] > 0 and len(session["run"]) > 0
    assert [d["name"] for d in session["defenses"]] == ["gaussian"]
    tap = state["tap"]["observers"]["server"]
    assert 0 < tap["bytes"] <= tap["max_bytes"] == 1 << 20 and snapshot(live["service"])["tap"] is None  # (twin: not recording)
    body = json.dumps(state)
    assert TOKEN not in body and "not-the-token" not in body
    assert not any(len(v) > 64 for v in _lists(state)), "no tensor content: no long list of numbers"


def _lists(value):
    if isinstance(value, list):
        if value and all(isinstance(v, (int, float)) for v in value):
            yield value
        for v in value:
            yield from _lists(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _lists(v)


def pages_follow_the_run_to_its_end(live):
    """Last: the run is released and ends; both pages' endpoints say what became of it."""
    run = get(live["run_url"] + "api/run")
    assert run["status"] == "training" and run["summary"] is None  # the twin, while held
    summary = live["finish"]()
    run = get(live["run_url"] + "api/run")
    assert run["status"] == "finished" and run["step"] == 4 and run["rows"] == 4
    assert run["summary"]["eval_loss_after"] == summary["eval_loss_after"]
    assert run["privacy"]["spent"]["gaussian_epsilon"] == summary["gaussian_epsilon"]
    assert run["bytes_up"] == sum(r["bytes_up"] for r in get(live["run_url"] + "api/metrics")["rows"])
    state = get(live["server_url"] + "api/server")
    assert state["sessions"] == [] and [e["client_id"] for e in state["ended"]] == ["alice"]
