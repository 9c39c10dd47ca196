"""Web pages (issue 15): the employee's wallet, finance's reports, the API docs.

The pages are static HTML, CSS and JavaScript in `service/web/`, served by
the service itself, and every number they show comes from the same `/v1`
API that other callers use, with the caller's own token: a page holds no
data and needs no token to load, and the API decides what each caller may
see, exactly as for curl. So no page can show what its caller may not read.

Nothing loads from outside the service: the OpenAPI docs are Swagger UI
from the pinned `swagger-ui-py` package, served under `/static/swagger-ui/`.
Every page answer carries a Content-Security-Policy that allows scripts,
styles, images, fonts and fetches from the service's own origin only (no
inline script), and may not be framed.

Sign-in: the page keeps a bearer token in sessionStorage (gone when the tab
closes), or the company's SSO proxy sets `TOKENLEDGER_PAGES_TOKEN_HEADER`
on every request (`service.auth.bearer`). In development, `/dev/sign-in`
mints an employee token; it is not routed at all in production.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import mimetypes
import time
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

import jwt
import msgspec
from litestar import Request, Response, Router, get, post
from litestar.config.cors import CORSConfig
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import CacheControlHeader
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.params import FromPath, JSONBody
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.auth import public
from service.config import Config
from service.journal import Database

WEB_DIR = Path(__file__).resolve().parent / "web"


def _swagger_ui_dir() -> Path:
    """The static files of the pinned swagger-ui-py package, found without
    importing it (its code adapts other frameworks; only the files are used)."""
    spec = importlib.util.find_spec("swagger_ui")
    assert spec is not None and spec.origin, "swagger-ui-py is not installed"
    return Path(spec.origin).resolve().parent / "static"


SWAGGER_UI_DIR = _swagger_ui_dir()

# Only the service's own origin, for everything; no inline script or style
# attribute in markup, no plugins, no framing, forms post only back here.
# `img-src data:` is for the SVG icons Swagger UI's stylesheet embeds.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
# The API's own answers are JSON or CSV for programs, and stay as they were
# (one less thing on the hot path); everything else the service serves is
# for a browser.
_API_PREFIX = "/v1/"

# Scripts, styles and Swagger UI are kept by the browser this long: a page
# opened again loads only its data (a new release reaches an open browser
# within five minutes).
STATIC_CACHE = CacheControlHeader(max_age=300)

# A signed-in development token lives this long.
DEV_TOKEN_SECONDS = 8 * 3600


def security_headers(app: ASGIApp) -> ASGIApp:
    """Adds PAGE_HEADERS to every answer outside /v1 (pages, static files,
    the docs, errors of unknown paths)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_API_PREFIX):
            await app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    h for h in message.get("headers", []) if h[0].lower() != b"x-frame-options"
                ]
                headers.extend(PAGE_HEADERS)
                message["headers"] = headers
            await send(message)

        await app(scope, receive, send_wrapper)

    return middleware


def cors_config(config: Config) -> CORSConfig | None:
    """CORS for the origins in TOKENLEDGER_CORS_ORIGINS, or none at all (closed)."""
    origins = parse_origins(config.cors_origins)
    if not origins:
        return None
    return CORSConfig(
        allow_origins=origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
        expose_headers=["X-Request-Id", "Idempotent-Replayed", "Retry-After"],
        # Tokens travel in Authorization, never in cookies: no credentials mode.
        allow_credentials=False,
        max_age=600,
    )


def parse_origins(text: str) -> list[str]:
    """`scheme://host[:port]` origins, comma-separated; a wildcard or a path is refused."""
    origins = [o.strip() for o in text.split(",") if o.strip()]
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest or "*" in rest:
            raise ValueError(
                f"TOKENLEDGER_CORS_ORIGINS: {origin!r} is not an origin "
                "(scheme://host[:port], no path, no wildcard)"
            )
    return origins


class LocalSwagger(OpenAPIRenderPlugin):
    """Swagger UI at /schema from the service's own static files (the pinned
    swagger-ui-py package), started by a script file, not inline."""

    def __init__(self) -> None:
        super().__init__(path="/", favicon="", style="")
        self.html = (WEB_DIR / "docs.html").read_bytes()

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return self.html


def _page(name: str) -> Any:
    body = (WEB_DIR / name).read_bytes()

    async def handler() -> Response[bytes]:
        return Response(body, media_type="text/html; charset=utf-8")

    return handler


def page_routes(config: Config) -> list[Any]:
    """The pages, their static files, and (outside production) the
    development sign-in."""
    files = read_static(WEB_DIR / "static")
    routes: list[Any] = [
        get("/wallet", opt=public(), include_in_schema=False, name="page_wallet")(
            _page("wallet.html")
        ),
        get("/finance", opt=public(), include_in_schema=False, name="page_finance")(
            _page("finance.html")
        ),
        get("/sign-in", opt=public(), include_in_schema=False, name="page_sign_in")(
            _page("sign-in.html")
        ),
        create_static_files_router(
            path="/static/swagger-ui",
            directories=[SWAGGER_UI_DIR],
            name="swagger_ui",
            opt=public(),
            cache_control=STATIC_CACHE,
        ),
        web_static_router(files),
    ]
    if config.environment != "production":
        routes.append(dev_sign_in_router(config))
    return routes


class StaticFile(msgspec.Struct, frozen=True):
    body: bytes
    media_type: str
    etag: str


def read_static(directory: Path) -> dict[str, StaticFile]:
    """Every file under `directory` by its path below it, read once: the
    pages' own scripts, styles and icon (about 40 kB)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        body = path.read_bytes()
        # Litestar adds the charset of text/* types itself.
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[path.relative_to(directory).as_posix()] = StaticFile(body, media_type, etag)
    return files


def web_static_router(files: dict[str, StaticFile]) -> Router:
    """`/static/...`: the pages' files, from memory. They are on every page's
    first render, ahead of its API calls; Litestar's static-files router
    opened and read each from disk in a worker thread per request, 5 to 25
    ms apiece on a busy 2-core box (the server's request log). A file changes with a release (a
    restart), so each is read once, and an ETag lets a browser whose
    five-minute cache has run out revalidate it with a 304."""

    @get(
        "/{file_path:path}",
        name="web_static",
        opt=public(),
        include_in_schema=False,
        cache_control=STATIC_CACHE,
    )
    async def static_file(
        request: Request[Any, Any, Any], file_path: FromPath[PurePath]
    ) -> Response[bytes]:
        found = files.get(file_path.as_posix().lstrip("/"))
        if found is None:
            raise NotFoundException()
        if request.headers.get("if-none-match") == found.etag:
            return Response(b"", status_code=304, headers={"etag": found.etag})
        return Response(found.body, media_type=found.media_type, headers={"etag": found.etag})

    return Router(path="/static", route_handlers=[static_file])


# --- development sign-in -----------------------------------------------------


class DevSignIn(msgspec.Struct, forbid_unknown_fields=True):
    employee: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    role: Literal["employee", "hr", "finance"] = "employee"


class DevToken(msgspec.Struct, frozen=True):
    token: str
    expires_at: int
    employee: str
    roles: list[str]


def dev_sign_in_router(config: Config) -> Router:
    """`/dev/sign-in`: pick an employee (and a role) and get the employee token
    the API accepts, signed with TOKENLEDGER_JWT_HS256_SECRET. The POST is
    CSRF-protected (double-submit cookie): a sign-in another site could submit
    would sign the browser in as someone of that site's choosing."""
    assert config.environment != "production", "development sign-in in production"
    # The CSRF cookie's HMAC key: derived from the JWT secret, so every worker
    # and replica agrees on it; a fixed one when there is none (the sign-in
    # then refuses anyway).
    seed = (config.jwt_hs256_secret or "no-jwt-secret").encode()
    csrf_secret = hmac.new(seed, b"tokenledger dev sign-in csrf", hashlib.sha256).hexdigest()

    async def sign_in_page() -> Response[bytes]:
        return Response((WEB_DIR / "dev-sign-in.html").read_bytes(), media_type="text/html")

    async def sign_in(
        request: Request[Any, Any, Any],
        data: JSONBody[DevSignIn],
        ledger: NamedDependency[Database],
    ) -> DevToken:
        verifier = request.app.state.jwt_verifier
        if not (config.jwt_hs256_secret and config.jwt_issuer and config.jwt_audience):
            raise errors.InvalidRequest(
                "development sign-in needs TOKENLEDGER_JWT_ISSUER, TOKENLEDGER_JWT_AUDIENCE and "
                "TOKENLEDGER_JWT_HS256_SECRET"
            )
        if data.role != "employee" and (
            verifier is None or data.role not in verifier.allowed_roles
        ):
            raise errors.invalid(
                "$.role",
                "role not allowed in employee tokens",
                f"employee tokens may not carry the {data.role} role here: add it to "
                "TOKENLEDGER_JWT_ALLOWED_ROLES",
            )
        found = await ledger.fetchval("employee_json", data.employee, ledger.now())
        if found is None:
            raise errors.EmployeeNotFound(f"no employee {data.employee}", employee=data.employee)
        expires = int(time.time()) + DEV_TOKEN_SECONDS
        roles = [] if data.role == "employee" else [data.role]
        claims = {
            "iss": config.jwt_issuer,
            "aud": config.jwt_audience,
            "sub": data.employee,
            "exp": expires,
            "iat": int(time.time()),
            config.jwt_roles_claim: roles,
        }
        token = jwt.encode(claims, config.jwt_hs256_secret, algorithm="HS256")
        return DevToken(token, expires, data.employee, ["employee", *roles])

    handlers: Sequence[Any] = [
        get("/sign-in", opt=public(), include_in_schema=False, name="dev_sign_in_page")(
            sign_in_page
        ),
        post(
            "/sign-in", opt=public(), include_in_schema=False, name="dev_sign_in", status_code=200
        )(sign_in),
    ]
    return Router(
        path="/dev",
        route_handlers=list(handlers),
        middleware=[
            DefineMiddleware(
                CSRFMiddleware,
                config=CSRFConfig(
                    secret=csrf_secret,
                    cookie_name="tl_csrf",
                    cookie_path="/dev",
                    header_name="x-csrf-token",
                    cookie_samesite="strict",
                ),
            )
        ],
    )
