"""The live explorer's web app (Starlette): the page, its own assets, ``POST /api/capture``.

Design note
-----------
*Access.* With a ``token`` every request must carry it: ``?token=`` in the URL (the page then
keeps it in a same-site cookie for its assets and API calls), an ``Authorization: Bearer``
header, or that cookie; anything else gets a 401. ``serve`` always sets a token when it binds
an address other than the loopback one (as Jupyter does).

*DNS rebinding.* Without a token (the loopback address), ``serve`` also passes ``hosts``: a
request whose Host header names anything but this machine gets a 403, so a web page whose
name was rebound to 127.0.0.1 cannot use the server.

*What is served.* The page, the four asset files named in ``ASSETS`` (read from this package,
never a path built from the request), ``GET /api/info`` and ``POST /api/capture``. Every answer
carries a Content-Security-Policy that allows scripts, styles, images and connections from
this origin only, so the page can fetch nothing from the network and no injected markup could
run a script.

*Input.* The body is read up to ``MAX_BODY`` bytes (413 past it); it must be a JSON object
(400 otherwise) with ``text`` and optional ``text_pair``, ``target`` and ``generate``; lengths
past the limits get a 413 that names them; other bad values a 422.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Collection
from importlib import resources
from typing import Any

from ..errors import AttnScopeError
from .engine import Explorer, LengthError

MAX_BODY = 256 * 1024
COOKIE = "attnscope_token"
ASSETS = {  # all in attnscope/view, which the package data ships (view/*.js, view/*.css)
    "page.js": ("attnscope.view", "text/javascript"),
    "page.css": ("attnscope.view", "text/css"),
    "serve.js": ("attnscope.view", "text/javascript"),
    "serve.css": ("attnscope.view", "text/css"),
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
FIELDS = {"text", "text_pair", "target", "generate"}


def create_app(
    explorer: Explorer, *, token: str | None = None, hosts: Collection[str] | None = None
) -> Any:
    """The Starlette app serving ``explorer``; ``token``: the access token every request needs;
    ``hosts``: the only names a request's Host header may carry (None: any)."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import HTTPConnection, Request
        from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
        from starlette.routing import Route
    except ImportError:
        raise AttnScopeError(
            "attnscope serve needs Starlette and uvicorn: pip install 'attnscope[serve]'"
        ) from None
    if token is not None and (not isinstance(token, str) or not token):
        raise AttnScopeError("token must be a non-empty string (or None on localhost)")

    def error(status: int, message: str) -> Response:
        return JSONResponse({"error": message}, status_code=status)

    def allowed(request: HTTPConnection) -> bool:
        if token is None:
            return True
        header = request.headers.get("authorization", "")
        given = [
            request.query_params.get("token", ""),
            request.cookies.get(COOKIE, ""),
            header[7:] if header.lower().startswith("bearer ") else "",
            header[6:] if header.lower().startswith("token ") else "",
        ]
        return any(hmac.compare_digest(g.encode(), token.encode()) for g in given if g)

    async def index(request: Request) -> Response:
        response = HTMLResponse(_page(explorer))
        if token is not None and request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:  # a fixed list: no path from the request reaches the disk
            return PlainTextResponse("not found", status_code=404)
        package, media = ASSETS[name]
        text = resources.files(package).joinpath(name).read_text(encoding="utf-8")
        return Response(text, media_type=media)

    async def info(request: Request) -> Response:
        return JSONResponse(explorer.describe())

    async def capture(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            return error(413, f"the request body is over the limit of {MAX_BODY} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return error(413, f"the request body is over the limit of {MAX_BODY} bytes")
        try:
            fields = json.loads(bytes(body))
        except (ValueError, RecursionError) as failure:
            return error(
                400,
                f"the body is not valid JSON ({failure}); send an object like "
                '{"text": "The cat sat."}',
            )
        if not isinstance(fields, dict):
            return error(400, 'the body must be a JSON object like {"text": "The cat sat."}')
        unknown = sorted(set(fields) - FIELDS)
        if unknown:
            return error(422, f"unknown fields {unknown}; give {sorted(FIELDS)}")
        try:
            answer = await run_in_threadpool(
                explorer.capture,
                fields.get("text"),
                fields.get("text_pair") or None,
                fields.get("target") or None,
                fields.get("generate", 0) or 0,
            )
        except LengthError as failure:
            return error(413, str(failure))
        except AttnScopeError as failure:
            return error(422, str(failure))
        return JSONResponse(answer)

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/assets/{name}", asset),
            Route("/api/info", info),
            Route("/api/capture", capture, methods=["POST"]),
        ]
    )

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        # pure ASGI: the body stream reaches the endpoint untouched
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        connection = HTTPConnection(scope)
        if hosts is not None and connection.url.hostname not in hosts:
            # a page elsewhere that rebinds its DNS name to 127.0.0.1 still sends its own name
            refused = PlainTextResponse(
                f"403: this attnscope server answers to {', '.join(sorted(hosts))} only",
                status_code=403,
            )
            await refused(scope, receive, with_headers)
            return
        if allowed(connection):
            await app(scope, receive, with_headers)
            return
        refused = PlainTextResponse(
            "401: this attnscope server needs its access token: open the URL printed at its "
            "start (.../?token=...), or send 'Authorization: Bearer <token>'",
            status_code=401,
        )
        await refused(scope, receive, with_headers)

    return guarded


def _page(explorer: Explorer) -> str:
    """The explorer's document: a form (built here, no script needed to see it) and the
    results area that ``serve.js`` fills with one page per text."""
    from html import escape

    from ..view import safe_json

    about = explorer.describe()
    extra = ""
    if about["encoder_decoder"]:
        extra += (
            '<label>Target (decoder text) <input type="text" name="target" '
            'id="attnscope-target" placeholder="default: the start token"></label>'
        )
    if about["causal"]:
        extra += (
            '<label>Generate <input type="number" name="generate" id="attnscope-generate" '
            f'min="0" max="{about["max_new_tokens"]}" value="0"> tokens (greedy; the maps '
            "of every step stitched together)</label>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>attnscope serve: {escape(explorer.name)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="assets/page.css">'
        '<link rel="stylesheet" href="assets/serve.css">'
        '<script type="application/json" id="attnscope-serve-info">'
        f"{safe_json(about)}</script>"
        '<script src="assets/page.js"></script><script src="assets/serve.js"></script>'
        '</head><body><main id="attnscope-serve">'
        f"<h1>attnscope serve <small>{escape(explorer.name)}</small></h1>"
        '<form id="attnscope-form" method="post" action="api/capture">'
        '<label>Text <textarea name="text" id="attnscope-text" rows="3" required '
        f'maxlength="{about["max_chars"]}" placeholder="Type a text"></textarea></label>'
        '<label>Text pair (optional) <input type="text" name="text_pair" '
        'id="attnscope-text-pair"></label>'
        f"{extra}"
        '<label>Compare with (optional) <textarea name="compare" id="attnscope-compare" '
        f'rows="2" maxlength="{about["max_chars"]}" placeholder="A second text, shown side by '
        'side"></textarea></label>'
        f'<p class="attnscope-limit">At most {about["max_tokens"]} tokens.</p>'
        '<button type="submit" id="attnscope-submit">Show attention</button></form>'
        '<p id="attnscope-status" role="status"></p>'
        '<div id="attnscope-results"></div></main></body></html>\n'
    )
