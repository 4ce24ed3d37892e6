"""CORS for browser clients: off unless origins are configured (`--cors-origin`, chart `gateway.cors`).

Off (the default), the gateway sends no CORS header: a page on another origin cannot read an answer, and as POST
bodies must be `application/json` (body.py) it cannot send one without a preflight, which is then answered 404
like any unknown request. With origins configured, a preflight (OPTIONS with Origin and
Access-Control-Request-Method) from an allowed origin is 204 with the methods, the requested headers and a
Max-Age of 600 s, and every answer to an allowed origin, streamed ones included, carries
Access-Control-Allow-Origin (the origin itself, or `*` when `*` is configured) and Vary: Origin. Other origins
get no CORS header.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def enable(app: web.Application, origins: Sequence[str]) -> None:
    """Answer preflights and mark answers for `origins` (exact `scheme://host[:port]`, or `*`)."""
    allowed = frozenset(origins)

    def allowed_origin(request: web.BaseRequest) -> str | None:
        origin = request.headers.get("Origin")
        if origin is None or not ("*" in allowed or origin in allowed):
            return None
        return "*" if "*" in allowed else origin

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
                and allowed_origin(request) is not None):
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "")[:1024],
                "Access-Control-Max-Age": "600"})
        return await handler(request)

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        origin = allowed_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")

    app.middlewares.append(preflight)
    app.on_response_prepare.append(mark)
