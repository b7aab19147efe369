"""The ntfy notifier: sends one alert to an ntfy topic, so it pages a phone.

Each notification is published as JSON to the server root (`POST https://host/`
with the topic in the body), so titles and messages in any language arrive as
UTF-8 without the header encoding that the plain `POST /topic` form needs.
A path prefix in the topic URL (`https://host/ntfy/topic`, for a server behind
a reverse proxy) is kept: the root is then `https://host/ntfy/`.

Anyone who has the name of an ntfy topic can read its messages, so the topic
URL is a secret. Errors, log lines and `repr()` show at most the scheme and
host of the server, never the topic or the token.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import math
import re
from typing import Any
from urllib.parse import urlsplit

import requests

from ..errors import ConfigurationError
from .watcher import DeliveryError, Notification

__all__ = ["NtfyNotifier"]

logger = logging.getLogger(__name__)

# ntfy accepts topic names of this form (server/server.go, `topicRegex`, ntfy v2).
_TOPIC = re.compile(r"[-_A-Za-z0-9]{1,64}")

# Maximum length of the server's error text copied into a DeliveryError message.
_MAX_ERROR_CHARS = 200


class NtfyNotifier:
    """Publishes notifications to one ntfy topic, with a bearer token or basic auth if given.

    `send()` returns when the server accepted the message (2xx) and raises
    DeliveryError otherwise. Timeouts, connection errors, 408, 429 and 5xx
    are retryable; other statuses (a wrong token, a redirect) are not.
    """

    def __init__(
        self,
        topic_url: str,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout_seconds: float = 5,
        session: requests.Session | None = None,
    ) -> None:
        self._root_url, self._topic, self._server = _parse_topic_url(topic_url)
        self._headers = {"Content-Type": "application/json; charset=utf-8"}
        self._auth_kind = _auth_header(self._headers, token, username, password)
        if (
            self._auth_kind != "none"
            and urlsplit(self._root_url).scheme == "http"
            and not _is_loopback(self._root_url)
        ):
            logger.warning(
                "the ntfy server uses plain http, so the %s is sent unencrypted; use https", self._auth_kind
            )

        if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, int | float):
            raise ConfigurationError(
                f"invalid ntfy timeout_seconds {timeout_seconds!r}: use a number of seconds > 0"
            )
        if not math.isfinite(timeout_seconds) or timeout_seconds <= 0:
            raise ConfigurationError(
                f"invalid ntfy timeout_seconds {timeout_seconds!r}: use a number of seconds > 0"
            )
        self.timeout_seconds = float(timeout_seconds)

        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()

    def __repr__(self) -> str:
        return (
            f"NtfyNotifier(server={self._server!r}, auth={self._auth_kind!r}, "
            f"timeout_seconds={self.timeout_seconds})"
        )

    def send(self, notification: Notification) -> str | None:
        """Publish one notification; return the message id that the server assigned, if it sent one.

        Raises DeliveryError when the server did not accept it. The error
        message names the failure (timeout, status code) but never the URL.
        """
        payload: dict[str, Any] = {
            "topic": self._topic,
            "title": notification.title,
            "message": notification.message,
            "priority": notification.priority,
            "tags": list(notification.tags),
        }
        if notification.click:
            payload["click"] = notification.click
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")

        try:
            response = self._session.post(
                self._root_url,
                data=body,
                headers=self._headers,
                timeout=self.timeout_seconds,
                # requests follows a 301 or 302 with a GET, and a server may reply 200 to it.
                allow_redirects=False,
            )
        except requests.Timeout:
            # `from None`: the requests exception text contains the server URL.
            raise DeliveryError(f"ntfy request timed out after {self.timeout_seconds:g} s") from None
        except requests.RequestException as exc:
            raise DeliveryError(f"ntfy request failed: {type(exc).__name__}") from None

        with response:
            if 200 <= response.status_code < 300:
                return _message_id(response)
            raise _status_error(response)

    def close(self) -> None:
        """Close the HTTP session, unless the caller passed it in."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> NtfyNotifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse_topic_url(topic_url: str) -> tuple[str, str, str]:
    """Split a topic URL into (root URL, topic, scheme://host); raise ConfigurationError if invalid.

    No message repeats the URL, because the topic name in it is a secret.
    """
    if not isinstance(topic_url, str) or not topic_url.strip():
        raise ConfigurationError(
            "the ntfy topic URL is missing: use https://ntfy.sh/<topic> or your server's URL"
        )
    try:
        parts = urlsplit(topic_url.strip())
        port = parts.port
    except ValueError:
        raise ConfigurationError("the ntfy topic URL is invalid: it does not parse as a URL") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigurationError("the ntfy topic URL is invalid: it must start with https:// (or http://)")
    if not parts.hostname:
        raise ConfigurationError("the ntfy topic URL is invalid: it has no host name")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            "the ntfy topic URL contains credentials: pass them as token= or username= and password= instead"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError("the ntfy topic URL is invalid: remove the query string or fragment")

    prefix, _, topic = parts.path.rstrip("/").rpartition("/")
    if not _TOPIC.fullmatch(topic):
        raise ConfigurationError(
            f"the ntfy topic URL is invalid: its last path segment (the topic, {len(topic)} characters) "
            "must be 1 to 64 letters, digits, '-' or '_'"
        )
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port is None else f"{host}:{port}"
    server = f"{parts.scheme}://{netloc}"
    return f"{server}{prefix}/", topic, server


def _auth_header(
    headers: dict[str, str], token: str | None, username: str | None, password: str | None
) -> str:
    """Add the Authorization header to `headers` and return the kind of auth ('token', 'basic' or 'none')."""
    if token is not None and (username is not None or password is not None):
        raise ConfigurationError("set either an ntfy token or a username and password, not both")
    if token is not None:
        if not isinstance(token, str) or not token.strip() or any(c in token for c in "\r\n\0"):
            raise ConfigurationError("the ntfy token is invalid: it must be a non-empty string on one line")
        headers["Authorization"] = f"Bearer {token.strip()}"
        return "token"
    if username is None and password is None:
        return "none"
    if not username or password is None:
        raise ConfigurationError("ntfy basic auth needs both a username and a password")
    if ":" in username:
        raise ConfigurationError("the ntfy username is invalid: it must not contain ':'")
    # Encoded as UTF-8 by hand: requests' basic auth encodes as Latin-1.
    credentials = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    headers["Authorization"] = f"Basic {credentials}"
    return "basic"


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _message_id(response: requests.Response) -> str | None:
    try:
        data = response.json()
    except ValueError:
        return None
    message_id = data.get("id") if isinstance(data, dict) else None
    return str(message_id) if message_id is not None else None


def _status_error(response: requests.Response) -> DeliveryError:
    status = response.status_code
    reason = _server_reason(response)
    message = f"ntfy server returned HTTP {status}" + (f": {reason}" if reason else "")
    if status in (408, 429) or status >= 500:
        return DeliveryError(message, status=status, retry_after_seconds=_retry_after(response))
    if status in (401, 403):
        message += "; check the ntfy token or username and password"
    elif 300 <= status < 400:
        message += "; use the final URL of the topic"
    return DeliveryError(message, status=status, retryable=False)


def _server_reason(response: requests.Response) -> str:
    """Return the `error` text of an ntfy JSON error body, shortened; an empty string for other bodies."""
    try:
        data = response.json()
    except ValueError:
        return ""
    reason = data.get("error") if isinstance(data, dict) else None
    return str(reason)[:_MAX_ERROR_CHARS] if reason else ""


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        seconds = float(value)
    except ValueError:
        # The HTTP-date form is rare for rate limits; the watcher's backoff applies instead.
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
