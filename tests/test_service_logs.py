"""Following one request: X-Request-ID in, in the answer's header and error bodies, in every log line it
writes; plain text or one JSON object per line (DIFFAD_LOG_FORMAT), one access line per request."""

import asyncio
import json
import logging
import re

import pytest
from diffad.service.logs import NO_REQUEST, accepted_request_id, configure_logging
from test_service import (
    encode,
    make_settings,
    make_tiny_bundle,
    noise_image,
    serving,
    solid_image,
    upload,
    wrapping_factory,
)

HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def png(seed=0) -> bytes:
    return encode(noise_image(40, 30, seed=seed))


def test_accepted_request_id_keeps_plausible_ids_and_replaces_the_rest():
    for given in ("3f2a9c", "line-7.part_42", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"):
        assert accepted_request_id(given) == given
    for given in (None, "", "a" * 129, "with space", "new\nline", "quote\"d", "ünïcode"):
        made = accepted_request_id(given)
        assert made != given and HEX_ID.fullmatch(made), given


def test_request_id_is_echoed_or_made_for_every_answer(bundle_dir):
    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, client):
            r = await client.post("/inspect", files=upload(png()), headers={"X-Request-ID": "line-7.part-42"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "line-7.part-42"
            assert "request_id" not in r.json()  # the header carries it; success bodies keep their schema
            r = await client.post("/inspect", files=upload(png()))
            made = r.headers["x-request-id"]
            assert HEX_ID.fullmatch(made)
            again = await client.post("/inspect", files=upload(png()))
            assert again.headers["x-request-id"] != made, "a new id per request"
            r = await client.get("/healthz", headers={"X-Request-ID": "x" * 500})
            assert r.status_code == 200 and HEX_ID.fullmatch(r.headers["x-request-id"])
    asyncio.run(scenario())


def test_every_error_body_names_its_request_id(bundle_dir):
    created = {}
    factory = wrapping_factory(created)

    cases = [  # (status, url, request arguments): answers made by the route, validation, decoding,
        # a middleware and a failing backend
        (404, "/inspect?model=nope", {"files": upload(png())}),
        (422, "/inspect", {"data": {"nothing": "here"}}),
        (400, "/inspect", {"files": upload(b"\x89PNG\r\n\x1a\nbroken")}),
        (413, "/inspect", {"files": upload(b"\0" * 20_000)}),
        (500, "/inspect", {"files": upload(solid_image(77))}),
    ]

    async def scenario():
        async with serving(make_settings(bundle_dir, max_upload_bytes=4096), factory) as (_, client):
            created["weave"].fail_on_value = 77
            for expected, url, kwargs in cases:
                rid = f"case-{expected}"
                r = await client.post(url, headers={"X-Request-ID": rid}, **kwargs)
                assert r.status_code == expected, (expected, r.text)
                body = r.json()
                assert body["request_id"] == rid and r.headers["x-request-id"] == rid, (expected, body)
                assert "detail" in body
                assert int(r.headers["content-length"]) == len(r.content)
    asyncio.run(scenario())


def logged(bundle_dir, capsys, log_format: str, requests: list[tuple[str, str, int]]) -> list[str]:
    """The lines the service wrote in log_format while answering requests: (url, X-Request-ID, status)."""
    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, client):
            configure_logging("info", log_format)
            for url, rid, status in requests:
                r = await client.post(url, files=upload(png()), headers={"X-Request-ID": rid})
                assert r.status_code == status, r.text
    asyncio.run(scenario())
    return capsys.readouterr().err.splitlines()


def test_json_logs_follow_one_request_in_one_access_line(bundle_dir, capsys, restore_logging):
    output = logged(bundle_dir, capsys, "json", [("/inspect?map=none", "follow-me-1", 200),
                                                 ("/inspect?model=nope", "lost-2", 404)])
    lines = [json.loads(line) for line in output if line.startswith("{")]
    assert lines, "no JSON log lines"
    for record in lines:
        assert {"timestamp", "level", "logger", "request_id", "message"} <= set(record), record
    access = [r for r in lines if r["logger"] == "diffad.access"]
    mine = [r for r in access if r["request_id"] == "follow-me-1"]
    assert len(mine) == 1, access
    line = mine[0]
    assert (line["method"], line["path"], line["status"], line["model"], line["level"]) == (
        "POST", "/inspect", 200, "weave", "INFO")
    assert line["batch_size"] == 1 and line["queue_ms"] >= 0 and line["inference_ms"] > 0
    assert line["duration_ms"] >= line["inference_ms"]
    lost = [r for r in access if r["request_id"] == "lost-2"]
    assert len(lost) == 1 and lost[0]["status"] == 404
    # lines written outside any request (startup, batches) say so rather than borrow an id
    assert all(r["request_id"] in (NO_REQUEST, "follow-me-1", "lost-2") for r in lines)


def test_text_logs_carry_the_request_id(bundle_dir, capsys, restore_logging):
    output = logged(bundle_dir, capsys, "text", [("/inspect?map=none", "plain-3", 200)])
    access = [line for line in output if " diffad.access " in line]
    assert len(access) == 1, access
    assert "[plain-3]" in access[0] and '"POST /inspect?map=none" 200' in access[0]
    assert "model=weave batch=1" in access[0]


def test_json_lines_leave_out_terminal_colours(capsys, restore_logging):
    configure_logging("info", "json")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 7,
                                            extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"})
    (line,) = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert line["message"] == "Started server process [7]" and "color_message" not in line


def test_log_format_is_checked():
    with pytest.raises(ValueError, match="text or json"):
        configure_logging("info", "yaml")
