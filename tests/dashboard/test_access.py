"""Who may read a dashboard: loopback by default (only to a loopback ``Host``), a token anywhere else, compared in
constant time; the token is never in a page, an answer or a header, and the run page shows no secret of the run."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import yaml

from splittune.track.dashboard import DashboardError, RunView, serve
from splittune.track.dashboard.http import COOKIE, TOKEN_ENV, cookie_of, read_token

TOKEN = "dashboard-token-0123456789abcdef"
ENDPOINTS = {"state": lambda query: {"step": 7, "loss": float("nan")}}


def fetch(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """Status, headers and body; redirects not followed (the token's redirect is what is tested)."""
    class Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    opener = urllib.request.build_opener(Stay)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def guarded():
    """A dashboard with a token, on every address (0.0.0.0: the case the token is for), read through loopback."""
    running = serve("0.0.0.0:0", "server.html", ENDPOINTS, TOKEN)
    yield f"http://127.0.0.1:{running.port}/"
    running.stop()


def test_off_loopback_a_dashboard_needs_a_token():
    with pytest.raises(DashboardError, match="needs a token"):
        serve("0.0.0.0:0", "run.html", ENDPOINTS, None)
    running = serve("127.0.0.1:0", "run.html", ENDPOINTS, None)  # the twin: loopback needs none
    try:
        assert fetch(running.url + "api/state")[0] == 200
    finally:
        running.stop()


def test_the_token_is_required_and_a_wrong_one_refused(guarded):
    assert fetch(guarded + "api/state")[0] == 401
    assert fetch(guarded)[0] == 401  # the page too
    assert fetch(guarded + "api/state", {"Authorization": "Bearer " + TOKEN[:-1] + "x"})[0] == 403
    assert fetch(guarded + "api/state", {"Cookie": f"{COOKIE}={cookie_of('another-token-0123456789')}"})[0] == 403
    assert fetch(guarded + "api/state?token=" + TOKEN[::-1])[0] == 403
    status, _, body = fetch(guarded + "api/state", {"Authorization": "Bearer " + TOKEN})  # the twin: the right one
    assert status == 200 and json.loads(body) == {"step": 7, "loss": None}  # (NaN is no JSON a browser parses)


def test_a_browser_presents_the_token_once_and_keeps_a_cookie_that_is_not_it(guarded):
    status, headers, _ = fetch(guarded + "?token=" + TOKEN)
    assert status == 303 and headers["Location"] == "/"  # the token leaves the address bar
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    value = cookie.split(";")[0]
    status, headers, body = fetch(guarded, {"Cookie": value})
    assert status == 200 and b"<html" in body and TOKEN.encode() not in body
    for name in ("dash.js", "server.js", "run.js", "dash.css", "run.html"):
        status, headers, body = fetch(guarded + "static/" + name, {"Cookie": value})
        assert status == 200 and TOKEN.encode() not in body and TOKEN not in json.dumps(headers)
    assert "script-src 'self'" in headers["Content-Security-Policy"]  # no inline or foreign script runs


def test_loopback_answers_only_to_a_loopback_host():
    """A page elsewhere that rebinds its own name to 127.0.0.1 sends its own name as Host: refused."""
    running = serve("127.0.0.1:0", "run.html", ENDPOINTS, None)
    try:
        assert fetch(running.url + "api/state", {"Host": "attacker.example"})[0] == 403
        assert fetch(running.url + "api/state", {"Host": f"localhost:{running.port}"})[0] == 200  # the twin
    finally:
        running.stop()


def test_assets_are_only_the_shipped_ones():
    running = serve("127.0.0.1:0", "run.html", ENDPOINTS, None)
    try:
        assert fetch(running.url + "static/dash.js")[0] == 200
        for path in ("static/../http.py", "static/%2e%2e/http.py", "static/http.py", "static/.hidden.js", "api/nothing"):
            assert fetch(running.url + path)[0] == 404, path
    finally:
        running.stop()


def test_tokens_come_from_a_file_or_the_environment(tmp_path):
    (tmp_path / "t").write_text(TOKEN + "\n")
    assert read_token(tmp_path / "t", {}, "--token-file") == TOKEN
    assert read_token(None, {TOKEN_ENV: TOKEN}, "--token-file") == TOKEN
    assert read_token(None, {}, "--token-file") is None
    (tmp_path / "short").write_text("abc")
    with pytest.raises(DashboardError, match="at least 16"):
        read_token(tmp_path / "short", {}, "--token-file")
    with pytest.raises(DashboardError, match="cannot read"):
        read_token(tmp_path / "absent", {}, "--token-file")


def test_the_run_page_shows_no_seed_of_the_run(tmp_path):
    """config.yaml records the defense seed (the client's noise is its own); the run's state shows everything else."""
    config = {"model": "tiny:llama", "mode": "split", "defense_seed": 918273645, "train": {"steps": 3},
              "defense": [{"name": "gaussian", "sigma": 0.5, "clip": 1.0, "seed": 5550123}], "codec": {"up": "raw", "down": "raw"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "client": 0, "loss": 2.5}) + "\n" + '{"step": 2, "cli')
    view = RunView(tmp_path)
    state = json.dumps(view.run())
    assert "918273645" in (tmp_path / "config.yaml").read_text()  # the twin: the file holds it
    assert "918273645" not in state and "5550123" not in state and '"gaussian"' in state
    assert view.run()["step"] == 1  # a row still being written waits for the next poll
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('ent": 0, "loss": 2.0}\n')
    assert view.metrics({"since": "1", "generation": str(view.generation)})["rows"] == [{"step": 2, "client": 0, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "client": 0, "loss": 9.0}) + "\n")  # rewritten: a resume
    again = view.metrics({"since": "2", "generation": "1"})
    assert again["from"] == 0 and [r["loss"] for r in again["rows"]] == [9.0]
