"""What the serve app and the farm monitor share on the web side: the pages (plain HTML, CSS and
JavaScript in web/, served as they are: no build step, nothing fetched from elsewhere), security headers
on every response, and one error shape ({"detail": {"field", "error"}}, serve/schema.py) for every error.

Plain FastAPI: no Ray, no torch.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

WEB_DIR = Path(__file__).resolve().parent / "web"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".png": "image/png"}
# no inline script or style, nothing from another origin; blob: for the player and contact sheet
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin",
                    "Cross-Origin-Resource-Policy": "same-origin"}


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


def install(app: FastAPI, index: str) -> None:
    """Security headers, the error shape, `/` (web/`index`) and `/static/NAME` (web/NAME) on `app`; create
    `app` with `dependencies=[Depends(known_query)]` for strict query parameters."""
    files = {p.name: p for p in WEB_DIR.iterdir() if p.suffix in MEDIA_TYPES}  # what exists, nothing else

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.path.startswith("/v1/") or request.url.path.startswith("/api/"):
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
