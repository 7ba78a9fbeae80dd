"""What the serve app and the farm monitor share on the web side: the pages (plain HTML, CSS and
JavaScript in web/, served as they are: no build step, nothing fetched from elsewhere), security headers
on every response, one error shape ({"detail": {"field", "error"}}, serve/schema.py) for every error, and
the Host check.

The Host check (against DNS rebinding: a web page whose name is made to resolve to 127.0.0.1 reads a
loopback server as its own origin): an app answers only to the names it serves, `served_hosts()`: the
loopback names (localhost, 127.0.0.1, [::1]) with any port, the listen address (--host) when it is a
real name or address (not 0.0.0.0 or ::), and the names allowed explicitly (--allowed-host NAME, or
`allowed_hosts` in the serve config; `*` for any). Any other Host, or none, is 421 Misdirected Request
in the error shape; `/healthz` answers every Host (probes call it by the pod's address).

Plain FastAPI: no Ray, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from longtake.request import RequestError

WEB_DIR = Path(__file__).resolve().parent / "web"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".png": "image/png"}
# no inline script or style, nothing from another origin; blob: for the player and contact sheet
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin",
                    "Cross-Origin-Resource-Policy": "same-origin"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
UNSPECIFIED = ("", "0.0.0.0", "::")  # listen addresses that name no host (every interface)
ANY_HOST = "*"
HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*|[0-9a-f:.]*:[0-9a-f:.]*")  # a DNS name, IPv4; IPv6
OPEN_PATHS = ("/healthz",)  # answered whatever the Host


def host_name(host: str) -> str:
    """The name in a Host header or an address: lower case, without its port, brackets or final dot
    ('[::1]:8000' -> '::1', 'Example.COM.:80' -> 'example.com')."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def served_hosts(bind: str | None = None, allowed: Iterable[str] | None = ()) -> tuple[str, ...]:
    """The Host names an app answers to: the loopback names, `bind` (the listen address) unless it is
    0.0.0.0 or ::, and `allowed` ('*': any). RequestError (field allowed_host) for a malformed name."""
    names = list(LOOPBACK_NAMES)
    if bind is not None and host_name(bind) not in UNSPECIFIED:
        names.append(host_name(bind))
    for value in allowed or ():
        name = ANY_HOST if value == ANY_HOST else host_name(str(value))
        if name != ANY_HOST and not HOST_NAME.fullmatch(name):
            raise RequestError("allowed_host", value, "a host name or address (example.com, 10.0.0.5, [fd00::1]) "
                                                      "or '*' for any")
        names.append(name)
    return tuple(dict.fromkeys(names))


def host_allowed(host: str | None, names: Iterable[str]) -> bool:
    """Whether a request's Host header (None: none sent) names one of `names` (served_hosts), any port."""
    names = tuple(names)
    return ANY_HOST in names or (host is not None and host_name(host) in names)


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": {"field": field, "error": message}}, status_code=status, headers=headers)


def _field(loc) -> str:
    parts = [str(x) for x in loc if x not in ("body", "query", "path", "header")]
    return ".".join(parts) or "request"


def known_query(request: Request) -> None:
    """A dependency for every route: a query parameter the route does not take is an error (422), not
    silently ignored (a misspelt `limt=5` would otherwise return the default page)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        known |= {p.alias for p in sub.query_params}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise HTTPException(422, {"field": unknown[0], "error": f"{unknown[0]}: no such query parameter (this route "
                                  f"takes {', '.join(sorted(known)) or 'none'})"})


def install(app: FastAPI, index: str, hosts: Iterable[str] | None = None) -> None:
    """The Host check, security headers, the error shape, `/` (web/`index`) and `/static/NAME` (web/NAME) on
    `app`; create `app` with `dependencies=[Depends(known_query)]` for strict query parameters. `hosts`: the
    names it answers to (served_hosts(); default: loopback only); `app.state.hosts` may be set later (the
    serve ingress learns its names when a replica starts)."""
    files = {p.name: p for p in WEB_DIR.iterdir() if p.suffix in MEDIA_TYPES}  # what exists, nothing else
    app.state.hosts = tuple(hosts) if hosts is not None else served_hosts()

    @app.middleware("http")
    async def host_check_and_headers(request: Request, call_next):
        names, host = request.app.state.hosts, request.headers.get("host")
        if request.scope["path"] in OPEN_PATHS or host_allowed(host, names):
            response = await call_next(request)
        else:  # DNS rebinding, or a name this server was not told it serves
            shown = ", ".join(f"[{n}]" if ":" in n else n for n in names)
            response = error(421, f"Host: got {host!r}, expected one of {shown} (any port): the names this server "
                                  "answers to (add one with --allowed-host, or allowed_hosts in the serve config)",
                             "Host")
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.scope["path"].startswith(("/v1/", "/api/")):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, dict) else {"field": None, "error": str(exc.detail)}
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        field = _field(first.get("loc", ()))
        value = first.get("input")
        return error(422, f"{field}: got {value!r}, expected {first['msg'][0].lower() + first['msg'][1:]}"
                     if "input" in first else f"{field}: {first['msg']}", field)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(files[index], media_type=MEDIA_TYPES[".html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = files.get(name)
        if path is None:
            raise HTTPException(404, f"no file {name!r}")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})
