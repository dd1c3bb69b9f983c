#!/usr/bin/env python3
"""Drives airlock with the official `openai` and `anthropic` Python SDKs.

Used by crates/airlock/tests/python_sdks.rs; runnable by hand too:

    SDK_CASE=openai_chat OPENAI_API_KEY=sess_... \
    OPENAI_BASE_URL=http://127.0.0.1:8080/openai/v1 .venv/bin/python sdk_client.py

Inputs (environment):
    SDK_CASE            the case to run (see CASES below)
    OPENAI_API_KEY      session token       (openai_* cases)
    OPENAI_BASE_URL     airlock base URL    (openai_* cases)
    ANTHROPIC_API_KEY   session token       (anthropic_* cases)
    ANTHROPIC_BASE_URL  airlock base URL    (anthropic_* cases)
    SDK_REVOKE_URL      the admin API's DELETE URL of the session, and
    SDK_REVOKE_TOKEN    its admin token     (*_stream_revoked only: the
                        operator's part, played by the case)
    SDK_AIRLOCK_PID     airlock's process   (openai_stream_drained only:
                        the case stops it with SIGTERM)

Output: one JSON line on stdout, `{"case": ..., "ok": true|false, ...}`.
Exit 0 when the case's expectation held, 1 when it did not (the reason is
in the JSON's "error" and on stderr), 2 for a usage error.

Every client is built with max_retries=0, so a refused call surfaces at
once instead of being retried, and with an httpx event hook that records
where the SDK put the token ("authorization" or "x-api-key"), so the test
can tell which placement airlock was given.
"""

import json
import os
import sys
import traceback

EXPECTED_TEXT = "Hello from mock"
PROMPT = [{"role": "user", "content": "Say hello"}]


class CaseFailed(Exception):
    """The case's expectation did not hold."""


def require_env(name):
    value = os.environ.get(name)
    if not value:
        raise CaseFailed(f"environment variable {name} is not set")
    return value


class AuthRecorder:
    """httpx request hook: remembers where each request carried `token`."""

    def __init__(self, token):
        self.token = token
        self.placements = []
        self.paths = []

    def __call__(self, request):
        headers = request.headers
        placement = []
        if headers.get("authorization") == f"Bearer {self.token}":
            placement.append("authorization")
        if headers.get("x-api-key") == self.token:
            placement.append("x-api-key")
        self.placements.append("+".join(placement) or "none")
        self.paths.append(f"{request.method} {request.url.path}")

    def summary(self):
        """The placement used by every request (they must all agree)."""
        distinct = sorted(set(self.placements))
        if len(distinct) != 1:
            return ",".join(distinct) or "no-request"
        return distinct[0]


def error_code(err):
    """`code` of an SDK APIStatusError, from either error body shape.

    The openai SDK unwraps `{"error": {...}}` into `err.body` and sets
    `err.code`; the anthropic SDK keeps the whole body.
    """
    code = getattr(err, "code", None)
    if code:
        return code
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("code"):
            return inner.get("code")
        if body.get("code"):
            return body.get("code")
    return None


def expect_error(call, error_class, status, code, what):
    """Runs `call`, which must raise `error_class` with `status` and `code`."""
    try:
        result = call()
    except error_class as err:
        got_status = getattr(err, "status_code", None)
        got_code = error_code(err)
        if got_status != status:
            raise CaseFailed(
                f"{what}: {error_class.__name__} with status {got_status}, expected {status}"
            ) from err
        if code is not None and got_code != code:
            raise CaseFailed(
                f"{what}: error code {got_code!r}, expected {code!r}; body: {getattr(err, 'body', None)!r}"
            ) from err
        return {"status": got_status, "code": got_code, "error_type": type(err).__name__}
    except Exception as err:  # noqa: BLE001 - reported as the case's failure
        raise CaseFailed(
            f"{what}: raised {type(err).__module__}.{type(err).__name__} "
            f"(status {getattr(err, 'status_code', None)}, body {getattr(err, 'body', None)!r}), "
            f"expected {error_class.__module__}.{error_class.__name__}: {err}"
        ) from err
    raise CaseFailed(f"{what}: succeeded ({result!r}), expected {error_class.__name__}")


def expect_text(text, what):
    if text != EXPECTED_TEXT:
        raise CaseFailed(f"{what}: got {text!r}, expected {EXPECTED_TEXT!r}")


# --- openai -----------------------------------------------------------------


def openai_client():
    import openai

    token = require_env("OPENAI_API_KEY")
    recorder = AuthRecorder(token)
    client = openai.OpenAI(
        api_key=token,
        base_url=require_env("OPENAI_BASE_URL"),
        max_retries=0,
        timeout=30.0,
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [recorder]}),
    )
    return openai, client, recorder


def case_openai_chat():
    _, client, recorder = openai_client()
    completion = client.chat.completions.create(model="gpt-mock", messages=PROMPT)
    text = completion.choices[0].message.content
    expect_text(text, "chat completion content")
    return {"text": text, "model": completion.model, "sent_auth": recorder.summary()}


def case_openai_stream():
    _, client, recorder = openai_client()
    stream = client.chat.completions.create(model="gpt-mock", messages=PROMPT, stream=True)
    parts = []
    chunks = 0
    finish_reason = None
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish_reason = choice.finish_reason
    text = "".join(parts)
    expect_text(text, "streamed chat completion content")
    if finish_reason != "stop":
        raise CaseFailed(f"stream finish_reason {finish_reason!r}, expected 'stop'")
    return {"text": text, "chunks": chunks, "sent_auth": recorder.summary()}


def case_openai_realtime():
    """The Realtime API's WebSocket, opened by the SDK from OPENAI_BASE_URL."""
    _, client, _ = openai_client()
    realtime = getattr(client, "realtime", None) or client.beta.realtime
    with realtime.connect(model="gpt-mock", max_retries=0) as connection:
        created = json.loads(connection.recv_bytes())
        if created.get("type") != "session.created":
            raise CaseFailed(f"first event {created!r}, expected session.created")
        connection.send({"type": "response.create"})
        echo = json.loads(connection.recv_bytes())
    if echo.get("type") != "mock.echo" or json.loads(echo.get("received", "{}")).get("type") != "response.create":
        raise CaseFailed(f"echo {echo!r}, expected the response.create event back")
    return {"first": created["type"], "echoed": echo["received"], "provider_saw": echo.get("authorization", "")}


def case_openai_out_of_scope():
    openai, client, recorder = openai_client()
    outcome = expect_error(
        lambda: client.models.list(),
        openai.PermissionDeniedError,
        403,
        "out_of_scope",
        "GET /v1/models",
    )
    return {**outcome, "sent_auth": recorder.summary()}


def case_openai_revoked():
    openai, client, recorder = openai_client()
    outcome = expect_error(
        lambda: client.chat.completions.create(model="gpt-mock", messages=PROMPT),
        openai.AuthenticationError,
        401,
        "invalid_token",
        "POST /v1/chat/completions with a revoked token",
    )
    return {**outcome, "sent_auth": recorder.summary()}


def revoke_session():
    """Revokes the session as an operator would, through the admin API."""
    import urllib.request

    request = urllib.request.Request(
        require_env("SDK_REVOKE_URL"),
        method="DELETE",
        headers={"Authorization": f"Bearer {require_env('SDK_REVOKE_TOKEN')}"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        if answer.status != 200:
            raise CaseFailed(f"revoking the session: HTTP {answer.status}")


def revoked_mid_stream(sdk, stream, recorder, message_of):
    """Revokes the session, then reads on (see `read_on_to_error`)."""
    revoke_session()
    return read_on_to_error(sdk, stream, recorder, message_of, "the revocation")


def read_on_to_error(sdk, stream, recorder, message_of, after):
    """Reads on after airlock ended the stream (`after` says how): the SDK
    (`sdk`, the module) must raise its API error for airlock's closing
    event, not a connection error nor another item of the stream. The error
    as the case's result."""
    try:
        for item in stream:
            raise CaseFailed(f"an item of the stream after {after}: {item!r}")
    except sdk.APIError as err:
        if isinstance(err, sdk.APIConnectionError):
            raise CaseFailed(f"a connection error, not airlock's event: {err!r}") from err
        return {
            "error_class": type(err).__name__,
            "message": message_of(err),
            "code": error_code(err),
            "sent_auth": recorder.summary(),
        }
    raise CaseFailed(f"the stream ended without an error after {after}")


def openai_held_stream():
    """A chat stream the mock holds open after its first chunk, that chunk
    read: (the SDK module, the stream, the recorder)."""
    openai, client, recorder = openai_client()
    stream = client.chat.completions.create(model="gpt-mock-hold", messages=PROMPT, stream=True)
    first = next(stream)
    if first.choices[0].delta.role != "assistant":
        raise CaseFailed(f"first chunk {first!r}")
    return openai, stream, recorder


def case_openai_stream_revoked():
    """A stream whose session is revoked mid-way raises the SDK's APIError
    with airlock's message (its closing `error` event), not a connection
    error. The mock holds the stream open after its first chunk."""
    openai, stream, recorder = openai_held_stream()
    return revoked_mid_stream(openai, stream, recorder, lambda err: err.message)


def case_openai_stream_drained():
    """A stream still running when airlock's shutdown drain ends raises the
    SDK's APIError with airlock's message (its closing `error` event). The
    case stops airlock (SIGTERM; its drain_timeout is short) after the
    first chunk, the mock holding the stream open."""
    import signal

    openai, stream, recorder = openai_held_stream()
    os.kill(int(require_env("SDK_AIRLOCK_PID")), signal.SIGTERM)
    return read_on_to_error(openai, stream, recorder, lambda err: err.message, "the stop")


# --- anthropic --------------------------------------------------------------


def anthropic_client(placement="api_key"):
    """An Anthropic client giving the token as `api_key=` (the SDK picks the
    header: `x-api-key` before 2.x, `Authorization: Bearer` from 2.x on),
    `auth_token=` (always `Authorization: Bearer`) or, for `x-api-key`,
    explicitly in the `x-api-key` header with `Authorization` omitted."""
    import anthropic

    token = require_env("ANTHROPIC_API_KEY")
    base_url = require_env("ANTHROPIC_BASE_URL")
    # The token goes only where `placement` says: SDKs before 2.x read
    # ANTHROPIC_API_KEY from the environment even when `auth_token=` is
    # given, and then send x-api-key instead of the Bearer token.
    os.environ.pop("ANTHROPIC_API_KEY", None)
    os.environ.pop("ANTHROPIC_AUTH_TOKEN", None)
    recorder = AuthRecorder(token)
    common = {
        "base_url": base_url,
        "max_retries": 0,
        "timeout": 30.0,
        "http_client": anthropic.DefaultHttpxClient(event_hooks={"request": [recorder]}),
    }
    if placement == "api_key":
        client = anthropic.Anthropic(api_key=token, **common)
    elif placement == "auth_token":
        client = anthropic.Anthropic(api_key=None, auth_token=token, **common)
    elif placement == "x-api-key":
        # `Omit` is exported from the package only in recent SDKs.
        # "X-Api-Key" spelled as the SDKs before 2.x spell it, so that it
        # replaces their header instead of being sent beside it.
        omit = getattr(anthropic, "Omit", None) or anthropic._types.Omit
        client = anthropic.Anthropic(
            api_key=token,
            default_headers={"X-Api-Key": token, "Authorization": omit()},
            **common,
        )
    else:
        raise ValueError(placement)
    return anthropic, client, recorder


def anthropic_message(placement):
    _, client, recorder = anthropic_client(placement)
    message = client.messages.create(model="claude-mock", max_tokens=16, messages=PROMPT)
    text = "".join(block.text for block in message.content if block.type == "text")
    expect_text(text, "message text")
    return {"text": text, "model": message.model, "sent_auth": recorder.summary()}


def case_anthropic_message():
    return anthropic_message("api_key")


def case_anthropic_message_bearer():
    return anthropic_message("auth_token")


def case_anthropic_message_x_api_key():
    return anthropic_message("x-api-key")


def case_anthropic_stream():
    _, client, recorder = anthropic_client()
    parts = []
    with client.messages.stream(model="claude-mock", max_tokens=16, messages=PROMPT) as stream:
        for text in stream.text_stream:
            parts.append(text)
        final = stream.get_final_message()
    text = "".join(parts)
    expect_text(text, "streamed message text")
    final_text = "".join(block.text for block in final.content if block.type == "text")
    expect_text(final_text, "final streamed message")
    if final.stop_reason != "end_turn":
        raise CaseFailed(f"stop_reason {final.stop_reason!r}, expected 'end_turn'")
    return {"text": text, "deltas": len(parts), "sent_auth": recorder.summary()}


def case_anthropic_out_of_scope():
    anthropic, client, recorder = anthropic_client()
    # count_tokens left the beta namespace in SDK 0.4x.
    messages = client.messages if hasattr(client.messages, "count_tokens") else client.beta.messages
    count_tokens = expect_error(
        lambda: messages.count_tokens(model="claude-mock", messages=PROMPT),
        anthropic.PermissionDeniedError,
        403,
        "out_of_scope",
        "POST /v1/messages/count_tokens",
    )
    models = None
    if hasattr(client, "models"):  # SDKs before 0.39 have no models API
        models = expect_error(
            lambda: client.models.list(),
            anthropic.PermissionDeniedError,
            403,
            "out_of_scope",
            "GET /v1/models",
        )
    return {
        **count_tokens,
        "models_list": models,
        "requests": recorder.paths,
        "sent_auth": recorder.summary(),
    }


def case_anthropic_revoked():
    anthropic, client, recorder = anthropic_client()
    outcome = expect_error(
        lambda: client.messages.create(model="claude-mock", max_tokens=16, messages=PROMPT),
        anthropic.AuthenticationError,
        401,
        "invalid_token",
        "POST /v1/messages with a revoked token",
    )
    return {**outcome, "sent_auth": recorder.summary()}


def case_anthropic_stream_revoked():
    """As case_openai_stream_revoked, with the Anthropic SDK: it raises its
    API error for airlock's `error` event, not a connection error."""
    anthropic, client, recorder = anthropic_client()
    stream = client.messages.create(
        model="claude-mock-hold", max_tokens=64, messages=PROMPT, stream=True
    )
    first = next(iter(stream))
    if first.type != "message_start":
        raise CaseFailed(f"first event {first!r}")
    return revoked_mid_stream(anthropic, stream, recorder, str)


CASES = {
    "openai_chat": case_openai_chat,
    "openai_stream": case_openai_stream,
    "openai_realtime": case_openai_realtime,
    "openai_out_of_scope": case_openai_out_of_scope,
    "openai_revoked": case_openai_revoked,
    "openai_stream_revoked": case_openai_stream_revoked,
    "openai_stream_drained": case_openai_stream_drained,
    "anthropic_message": case_anthropic_message,
    "anthropic_message_bearer": case_anthropic_message_bearer,
    "anthropic_message_x_api_key": case_anthropic_message_x_api_key,
    "anthropic_stream": case_anthropic_stream,
    "anthropic_out_of_scope": case_anthropic_out_of_scope,
    "anthropic_revoked": case_anthropic_revoked,
    "anthropic_stream_revoked": case_anthropic_stream_revoked,
}


def sdk_versions():
    versions = {}
    for name in ("openai", "anthropic"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = None
    return versions


def main():
    case = os.environ.get("SDK_CASE", "")
    if case not in CASES:
        print(
            json.dumps({"case": case, "ok": False, "error": f"unknown SDK_CASE {case!r}; one of {sorted(CASES)}"})
        )
        print(f"sdk_client: unknown SDK_CASE {case!r}; one of {sorted(CASES)}", file=sys.stderr)
        return 2
    result = {"case": case, "sdk": sdk_versions()}
    try:
        result.update(CASES[case]())
    except CaseFailed as err:
        result.update(ok=False, error=str(err))
        print(json.dumps(result))
        print(f"sdk_client: {case}: FAILED: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - an unexpected SDK error fails the case
        detail = (
            f"unexpected {type(err).__module__}.{type(err).__name__}: {err}"
            f" (status {getattr(err, 'status_code', None)}, body {getattr(err, 'body', None)!r})"
        )
        result.update(ok=False, error=detail)
        print(json.dumps(result))
        print(f"sdk_client: {case}: FAILED: {detail}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return 1
    result["ok"] = True
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
