"""The ntfy notifier against the local receiver, and the receiver's plain publish form."""

from __future__ import annotations

import base64
import logging
from email.header import Header

import pytest
import requests

from llmcost_mw.alerts import DeliveryError, Notification, NtfyNotifier
from llmcost_mw.demo.ntfy_receiver import NtfyReceiver
from llmcost_mw.errors import ConfigurationError

TOPIC = "s3cret-topic-Xy7"
TOKEN = "tk_notifiertesttoken"
UTF8_TITLE = "Budget ⚠ über 80 % — team-β"


@pytest.fixture
def receiver():
    with NtfyReceiver(hang_seconds=10) as server:
        yield server


def alert(title="Spend alert", **fields):
    return Notification(title=title, message=fields.pop("message", "alice spent $6.00"), **fields)


def test_utf8_title_arrives_intact(receiver):
    with NtfyNotifier(receiver.topic_url(TOPIC)) as notifier:
        notifier.send(alert(UTF8_TITLE, message="Überschreitung: 6,00 $ ✓"))

    [message] = receiver.messages
    assert message.title.encode("utf-8") == UTF8_TITLE.encode("utf-8")
    assert message.message == "Überschreitung: 6,00 $ ✓"
    assert UTF8_TITLE.encode("utf-8") in message.body


def test_json_publish_fields(receiver):
    with NtfyNotifier(receiver.topic_url(TOPIC)) as notifier:
        message_id = notifier.send(
            alert(priority=5, tags=("moneybag", "warning"), click="https://grafana.example/d/costs")
        )
        notifier.send(alert())

    first, second = receiver.messages
    assert message_id
    assert (first.topic, first.priority, first.tags) == (TOPIC, 5, ("moneybag", "warning"))
    assert first.click == "https://grafana.example/d/costs"
    assert second.click is None
    assert b'"click"' not in second.body


def test_token_sent_as_bearer(receiver):
    with NtfyNotifier(receiver.topic_url(TOPIC), token=TOKEN) as notifier:
        notifier.send(alert())

    assert receiver.messages[0].authorization == f"Bearer {TOKEN}"


def test_basic_auth_encodes_utf8(receiver):
    with NtfyNotifier(receiver.topic_url(TOPIC), username="jürgen", password="pässword") as notifier:
        notifier.send(alert())

    scheme, _, encoded = receiver.messages[0].authorization.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode("utf-8") == "jürgen:pässword"


@pytest.mark.parametrize(
    ("mode", "status"),
    [
        pytest.param("fail", 500, id="server-error"),
        pytest.param("throttle", 429, id="rate-limited"),
    ],
)
def test_server_errors_are_retryable(receiver, mode, status):
    receiver.set_mode(mode)

    with NtfyNotifier(receiver.topic_url(TOPIC)) as notifier, pytest.raises(DeliveryError) as caught:
        notifier.send(alert())

    assert (caught.value.status, caught.value.retryable) == (status, True)
    assert f"HTTP {status}" in str(caught.value)
    assert receiver.messages == []


def test_hang_raises_timeout(receiver):
    receiver.set_mode("hang", requests=1)

    with NtfyNotifier(receiver.topic_url(TOPIC), timeout_seconds=0.2) as notifier:
        with pytest.raises(DeliveryError, match=r"timed out after 0\.2 s") as caught:
            notifier.send(alert())
        notifier.send(alert("after the hang"))

    assert (caught.value.status, caught.value.retryable) == (None, True)
    assert [message.title for message in receiver.messages] == ["after the hang"]


def test_wrong_token_is_not_retryable():
    with NtfyReceiver(required_authorization="Bearer tk_right") as server:
        with NtfyNotifier(server.topic_url(TOPIC), token="tk_wrong") as notifier:
            with pytest.raises(DeliveryError, match="HTTP 401: unauthorized; check the ntfy token") as caught:
                notifier.send(alert())

    assert caught.value.retryable is False


def test_connection_refused_hides_url():
    server = NtfyReceiver().start()
    topic_url = server.topic_url(TOPIC)
    server.stop()

    with NtfyNotifier(topic_url, timeout_seconds=1) as notifier, pytest.raises(DeliveryError) as caught:
        notifier.send(alert())

    assert str(caught.value) == "ntfy request failed: ConnectionError"
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


class RecordingSession:
    """A stand-in for requests.Session that records one POST and returns a fixed response."""

    def __init__(self, status=200, headers=None):
        self.status = status
        self.headers = headers or {}
        self.calls = []

    def post(self, url, **kwargs):
        self.calls.append((url, kwargs))
        response = requests.Response()
        response.status_code = self.status
        response.headers.update(self.headers)
        response._content = b'{"id": "abc123"}'
        return response


def test_path_prefix_kept_in_root_url():
    session = RecordingSession()
    notifier = NtfyNotifier(f"https://ntfy.example.com:8443/ntfy/{TOPIC}", session=session)

    notifier.send(alert())

    url, kwargs = session.calls[0]
    assert url == "https://ntfy.example.com:8443/ntfy/"
    assert kwargs["allow_redirects"] is False
    assert kwargs["headers"]["Content-Type"] == "application/json; charset=utf-8"


def test_retry_after_header_read():
    session = RecordingSession(status=429, headers={"Retry-After": "120"})
    notifier = NtfyNotifier(f"https://ntfy.example.com/{TOPIC}", session=session)

    with pytest.raises(DeliveryError) as caught:
        notifier.send(alert())

    assert caught.value.retry_after_seconds == 120.0


def test_redirect_is_not_followed():
    notifier = NtfyNotifier(f"http://ntfy.example.com/{TOPIC}", session=RecordingSession(status=301))

    with pytest.raises(DeliveryError, match="HTTP 301; use the final URL") as caught:
        notifier.send(alert())

    assert caught.value.retryable is False


@pytest.mark.parametrize(
    ("topic_url", "problem"),
    [
        pytest.param("", "is missing", id="empty"),
        pytest.param(f"ftp://ntfy.example.com/{TOPIC}", "must start with https://", id="scheme"),
        pytest.param(f"ntfy.example.com/{TOPIC}", "must start with https://", id="no-scheme"),
        pytest.param(f"https:///{TOPIC}", "has no host name", id="no-host"),
        pytest.param(f"https://ntfy.example.com:99999/{TOPIC}", "does not parse", id="bad-port"),
        pytest.param(
            f"https://user:{TOKEN}@ntfy.example.com/{TOPIC}", "contains credentials", id="credentials"
        ),
        pytest.param(f"https://ntfy.example.com/{TOPIC}?title=x", "query string", id="query"),
        pytest.param("https://ntfy.example.com/", "(the topic, 0 characters)", id="no-topic"),
        pytest.param(f"https://ntfy.example.com/{TOPIC}!", "letters, digits, '-' or '_'", id="topic-chars"),
        pytest.param("https://ntfy.example.com/" + "a" * 65, "1 to 64", id="topic-too-long"),
    ],
)
def test_invalid_topic_url_rejected(topic_url, problem):
    with pytest.raises(ConfigurationError) as caught:
        NtfyNotifier(topic_url)

    message = str(caught.value)
    assert problem in message
    assert TOPIC not in message
    assert TOKEN not in message


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        pytest.param({"token": TOKEN, "username": "u", "password": "p"}, "not both", id="token-and-basic"),
        pytest.param({"username": "u"}, "both a username and a password", id="username-only"),
        pytest.param({"token": "tk_a\r\nX-Evil: 1"}, "on one line", id="token-newline"),
        pytest.param({"token": " "}, "non-empty", id="token-blank"),
        pytest.param({"timeout_seconds": 0}, "timeout_seconds 0", id="zero-timeout"),
    ],
)
def test_invalid_auth_or_timeout_rejected(options, problem):
    with pytest.raises(ConfigurationError, match=problem) as caught:
        NtfyNotifier(f"https://ntfy.example.com/{TOPIC}", **options)

    assert TOKEN not in str(caught.value)


def test_repr_hides_topic_and_token():
    notifier = NtfyNotifier(f"https://ntfy.example.com/{TOPIC}", token=TOKEN)

    text = repr(notifier)

    assert text == "NtfyNotifier(server='https://ntfy.example.com', auth='token', timeout_seconds=5.0)"


def test_plain_http_with_token_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="llmcost_mw.alerts.ntfy"):
        NtfyNotifier(f"http://ntfy.example.com/{TOPIC}", token=TOKEN)
        NtfyNotifier(f"http://127.0.0.1:8080/{TOPIC}", token=TOKEN)

    [record] = caplog.records
    assert "plain http" in record.getMessage()
    assert TOPIC not in caplog.text
    assert TOKEN not in caplog.text


# -- the receiver's plain publish form ------------------------------------------


def test_receiver_plain_publish_with_encoded_title(receiver):
    response = requests.post(
        receiver.topic_url("plain-topic"),
        data="Überschreitung ✓".encode(),
        headers={
            "Title": Header(UTF8_TITLE, "utf-8").encode(),
            "Priority": "high",
            "Tags": "warning, moneybag",
            "Click": "https://grafana.example/d/costs",
            "Authorization": "Bearer tk_x",
        },
        timeout=5,
    )

    assert response.status_code == 200
    [message] = receiver.messages
    assert (message.topic, message.title, message.message) == ("plain-topic", UTF8_TITLE, "Überschreitung ✓")
    assert (message.priority, message.tags) == (4, ("warning", "moneybag"))
    assert (message.click, message.authorization) == ("https://grafana.example/d/costs", "Bearer tk_x")


def test_receiver_plain_publish_raw_utf8_x_title(receiver):
    response = requests.post(
        receiver.topic_url("plain-topic"),
        data=b"body",
        headers={"X-Title": UTF8_TITLE.encode("utf-8"), "X-Priority": "2"},
        timeout=5,
    )

    assert response.status_code == 200
    assert (receiver.messages[0].title, receiver.messages[0].priority) == (UTF8_TITLE, 2)


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        pytest.param("bad.topic", b"m", {}, id="invalid-topic"),
        pytest.param("", b"{not json", {}, id="invalid-json"),
        pytest.param("", b'{"topic": "t", "priority": 9}', {}, id="invalid-priority"),
        pytest.param("t", b"m", {"Priority": "loud"}, id="invalid-priority-header"),
    ],
)
def test_receiver_rejects_bad_publish(receiver, path, body, headers):
    response = requests.post(receiver.url + path, data=body, headers=headers, timeout=5)

    assert response.status_code == 400
    assert receiver.messages == []


def test_receiver_mode_reverts_after_count(receiver):
    receiver.set_mode("fail", requests=2)

    statuses = [requests.post(receiver.topic_url("t"), data=b"m", timeout=5).status_code for _ in range(3)]

    assert statuses == [500, 500, 200]
    assert receiver.mode == "ok"
    assert receiver.request_count == 3


def test_receiver_rejects_unknown_mode(receiver):
    with pytest.raises(ValueError, match="invalid mode 'slow'"):
        receiver.set_mode("slow")
