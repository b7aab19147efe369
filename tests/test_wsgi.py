"""`LLMCostWSGIMiddleware` on plain WSGI apps, and the `LLMCostFlask` extension."""

from __future__ import annotations

import json
import logging
import queue
from dataclasses import asdict
from wsgiref.util import setup_testing_defaults

import anthropic
import flask
import pytest

from llmcost_mw import attribute, set_attribution
from llmcost_mw.context import capture, current_attribution
from llmcost_mw.demo.fake_api import FakeAnthropicAPI
from llmcost_mw.flask_ext import LLMCostFlask
from llmcost_mw.wsgi import ENVIRON_KEY, LLMCostWSGIMiddleware
from propagation_helpers import bearer_user, create_message, post, serve_wsgi, written_rows


def make_environ(**headers: str) -> dict:
    environ: dict = {}
    setup_testing_defaults(environ)
    for name, value in headers.items():
        environ["HTTP_" + name.upper()] = value
    return environ


class StartResponse:
    def __init__(self) -> None:
        self.status = None

    def __call__(self, status, headers, exc_info=None):
        self.status = status
        return lambda data: None


def snapshot_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [json.dumps(asdict(capture())).encode()]


def call(app, environ) -> list[bytes]:
    """Run one request the way a PEP 3333 server does: iterate the body, then close it."""
    body = app(environ, StartResponse())
    try:
        return list(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def snapshot_of(app, environ) -> dict:
    return json.loads(b"".join(call(app, environ)))


# --- the attribution inside a request --------------------------------------------------


def test_user_and_feature_from_environ():
    app = LLMCostWSGIMiddleware(
        snapshot_app,
        user_id=lambda environ: environ.get("HTTP_X_USER"),
        feature=lambda environ: environ["PATH_INFO"].strip("/"),
    )

    snapshot = snapshot_of(app, make_environ(x_user="alice", x_request_id="req-1") | {"PATH_INFO": "/report"})

    assert snapshot["user_id"] == "alice"
    assert snapshot["feature"] == "report"
    assert snapshot["request_id"] == "req-1"
    assert snapshot["context_missing"] is False


def test_user_header_option():
    app = LLMCostWSGIMiddleware(snapshot_app, user_header="X-User-Id")

    snapshot = snapshot_of(app, make_environ(x_user_id="carol"))

    assert snapshot["user_id"] == "carol"
    assert snapshot["feature"] is None


def test_user_id_and_header_rejected():
    with pytest.raises(ValueError, match="not both"):
        LLMCostWSGIMiddleware(snapshot_app, user_id=lambda environ: None, user_header="x-user")


def test_request_id_generated_per_request():
    app = LLMCostWSGIMiddleware(snapshot_app)

    first = snapshot_of(app, make_environ())
    second = snapshot_of(app, make_environ())

    assert first["request_id"]
    assert first["request_id"] != second["request_id"]


def test_attribution_in_environ_during_request():
    seen = {}

    def app(environ, start_response):
        seen["during"] = environ.get(ENVIRON_KEY)
        return snapshot_app(environ, start_response)

    environ = make_environ(x_user="dave")

    call(LLMCostWSGIMiddleware(app, user_header="x-user"), environ)

    assert seen["during"].user_id == "dave"
    assert seen["during"].closed is True
    # Removed at the end, so that environ and attribution form no reference cycle.
    assert ENVIRON_KEY not in environ


def test_failing_resolver_logged(caplog):
    def broken(environ):
        raise RuntimeError("resolver failed")

    app = LLMCostWSGIMiddleware(snapshot_app, user_id=broken)

    snapshot = snapshot_of(app, make_environ())

    assert snapshot["user_id"] is None
    assert snapshot["context_missing"] is False
    assert "user_id resolver" in caplog.text


# --- no leak between requests on one thread -------------------------------------------


def test_no_leak_on_reused_thread():
    app = LLMCostWSGIMiddleware(snapshot_app, user_header="x-user")

    first = snapshot_of(app, make_environ(x_user="alice"))
    between = current_attribution()
    second = snapshot_of(app, make_environ())

    assert first["user_id"] == "alice"
    assert between is None
    assert second["user_id"] is None
    assert second["context_missing"] is False


def test_no_leak_after_app_error():
    def failing(environ, start_response):
        set_attribution(feature="failed")
        raise RuntimeError("app failed")

    completed = []
    app = LLMCostWSGIMiddleware(failing, user_header="x-user", on_complete=completed.append)

    with pytest.raises(RuntimeError, match="app failed"):
        app(make_environ(x_user="alice"), StartResponse())

    assert current_attribution() is None
    assert len(completed) == 1
    assert completed[0].closed is True
    assert completed[0].feature == "failed"


def test_sdk_rows_on_reused_server_thread(tracker):
    # A non-threaded werkzeug server handles every request on one thread.
    with FakeAnthropicAPI() as fake_api:
        client = anthropic.Anthropic(base_url=fake_api.base_url, api_key="test-key", max_retries=0)

        def app(environ, start_response):
            create_message(client)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]

        wrapped = LLMCostWSGIMiddleware(
            app, user_id=lambda environ: bearer_user(environ.get("HTTP_AUTHORIZATION"))
        )
        with serve_wsgi(wrapped, threaded=False) as base:
            post(base, "/", user="alice")
            post(base, "/")
            post(base, "/", user="bob")
        client.close()
    rows = written_rows(tracker)

    assert [row["user_id"] for row in rows] == ["alice", None, "bob"]
    assert [row["context_missing"] for row in rows] == [False, False, False]
    assert len({row["request_id"] for row in rows}) == 3


# --- the response body ---------------------------------------------------------------


def test_generator_body_keeps_attribution():
    def streaming_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            yield capture().user_id.encode()
            yield b"," + str(capture().context_missing).encode()

        return body()

    app = LLMCostWSGIMiddleware(streaming_app, user_header="x-user")

    assert call(app, make_environ(x_user="alice")) == [b"alice", b",False"]
    assert current_attribution() is None


def test_close_ends_attribution_once():
    completed = []

    def streaming_app(environ, start_response):
        start_response("200 OK", [])
        yield b"chunk"

    app = LLMCostWSGIMiddleware(streaming_app, on_complete=completed.append)
    body = app(make_environ(), StartResponse())
    list(body)

    assert completed == []
    body.close()
    body.close()
    assert len(completed) == 1
    assert completed[0].closed is True


def test_early_close_runs_generator_cleanup_in_context():
    seen = {}

    def streaming_app(environ, start_response):
        start_response("200 OK", [])
        try:
            yield b"first"
            yield b"second"
        finally:
            # A streamed SDK call closed here still records the request's user.
            seen["cleanup"] = capture()

    app = LLMCostWSGIMiddleware(streaming_app, user_header="x-user")
    body = app(make_environ(x_user="alice"), StartResponse())
    next(body)
    body.close()  # a client that disconnects after the first chunk

    assert seen["cleanup"].user_id == "alice"
    assert seen["cleanup"].context_missing is False


def test_attribute_block_across_yields():
    # The generator enters `attribute` on one next() and leaves it on a later
    # one. Both run in the request's context, so the token reset is valid.
    def streaming_app(environ, start_response):
        start_response("200 OK", [])
        with attribute(feature="inner"):
            yield capture().feature.encode()
            yield capture().feature.encode()
        yield str(capture().feature).encode()

    app = LLMCostWSGIMiddleware(streaming_app, feature=lambda environ: "outer")

    assert call(app, make_environ()) == [b"inner", b"inner", b"outer"]


def test_list_body_returned_unchanged():
    completed = []
    app = LLMCostWSGIMiddleware(snapshot_app, on_complete=completed.append)

    body = app(make_environ(), StartResponse())

    assert type(body) is list
    assert len(completed) == 1


def test_file_wrapper_returned_unchanged(tmp_path):
    class FileWrapper:
        def __init__(self, filelike):
            self.filelike = filelike

        def __iter__(self):
            return iter([self.filelike.read()])

    path = tmp_path / "file.txt"
    path.write_bytes(b"data")

    def file_app(environ, start_response):
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](open(path, "rb"))

    app = LLMCostWSGIMiddleware(file_app)
    body = app(make_environ() | {"wsgi.file_wrapper": FileWrapper}, StartResponse())

    assert isinstance(body, FileWrapper)
    body.filelike.close()


def test_failing_on_complete_logged(caplog):
    def broken(attribution):
        raise RuntimeError("callback failed")

    app = LLMCostWSGIMiddleware(snapshot_app, on_complete=broken)

    with caplog.at_level(logging.ERROR):
        body = call(app, make_environ())

    assert body
    assert "on_complete callback" in caplog.text


# --- LLMCostFlask --------------------------------------------------------------------


def flask_app(**options) -> flask.Flask:
    app = flask.Flask(__name__)
    blueprint = flask.Blueprint("api", __name__, url_prefix="/api")

    @app.before_request
    def authenticate():
        flask.g.user_id = bearer_user(flask.request.headers.get("Authorization"))

    @app.get("/summarize/<doc_id>")
    def summarize(doc_id):
        return asdict(capture())

    @app.get("/named")
    def named():
        set_attribution(feature="named-feature")
        return asdict(capture())

    @blueprint.get("/items/<int:item_id>")
    def item(item_id):
        return asdict(capture())

    @app.errorhandler(404)
    def not_found(error):
        return asdict(capture()), 404

    app.register_blueprint(blueprint)
    options.setdefault("user_id", lambda request: flask.g.get("user_id"))
    LLMCostFlask(app, **options)
    return app


def test_flask_feature_is_url_rule():
    client = flask_app().test_client()

    body = client.get("/summarize/7", headers={"Authorization": "Bearer alice"}).json

    assert body["feature"] == "/summarize/<doc_id>"
    assert body["user_id"] == "alice"


def test_flask_blueprint_rule_has_prefix():
    body = flask_app().test_client().get("/api/items/3").json

    assert body["feature"] == "/api/items/<int:item_id>"
    assert body["user_id"] is None


def test_flask_unmatched_path_no_feature():
    response = flask_app().test_client().get("/missing")

    assert response.status_code == 404
    assert response.json["feature"] is None
    assert response.json["context_missing"] is False


def test_flask_endpoint_as_feature():
    client = flask_app(feature=lambda request: request.endpoint).test_client()

    assert client.get("/summarize/7").json["feature"] == "summarize"
    assert client.get("/api/items/3").json["feature"] == "api.item"


def test_flask_feature_callable_falls_back():
    client = flask_app(feature=lambda request: request.headers.get("x-feature")).test_client()

    assert client.get("/summarize/1", headers={"x-feature": "from-header"}).json["feature"] == "from-header"
    assert client.get("/summarize/1").json["feature"] == "/summarize/<doc_id>"


def test_flask_failing_feature_falls_back(caplog):
    def broken(request):
        raise RuntimeError("feature failed")

    body = flask_app(feature=broken).test_client().get("/summarize/1").json

    assert body["feature"] == "/summarize/<doc_id>"
    assert "feature resolver" in caplog.text


def test_flask_set_attribution_in_view():
    completed = queue.Queue()
    client = flask_app(on_complete=completed.put).test_client()

    with client.get("/named", headers={"Authorization": "Bearer erin"}) as response:
        body = response.json
    final = completed.get(timeout=5)

    assert body["feature"] == "named-feature"
    assert final.feature == "named-feature"
    assert final.user_id == "erin"


def test_flask_values_frozen_at_teardown():
    # After teardown there is no request context. The values resolved at
    # teardown are kept, so a generator or thread still gets them.
    completed = queue.Queue()
    client = flask_app(on_complete=completed.put).test_client()

    client.get("/summarize/9", headers={"Authorization": "Bearer frank"}).close()
    final = completed.get(timeout=5)

    assert final.user_resolver is None
    assert final.feature_resolver is None
    assert final.user_id == "frank"
    assert final.feature == "/summarize/<doc_id>"


def test_flask_init_app_twice_rejected():
    app = flask_app()

    with pytest.raises(RuntimeError, match="already registered"):
        LLMCostFlask().init_app(app)


def test_flask_user_header_option():
    app = flask.Flask(__name__)
    app.get("/")(lambda: asdict(capture()))
    LLMCostFlask(app, user_header="x-user-id")

    assert app.test_client().get("/", headers={"x-user-id": "gina"}).json["user_id"] == "gina"
