"""The console's Starlette app: HTML pages and a JSON API, both thin layers over :class:`Operations`.

Handlers are ``async`` and call :class:`Operations` directly: the store connection and the bus are
used from one thread (the event loop's), one request at a time, as the CLI uses them.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from transport import DeadLetter, TransportError

from .._errors import ActionRefused, ConfigurationError, NotFound, SagasError, StoreError
from .._saga import Saga
from ..operations import Operations
from ._diagram import diagram
from ._security import AUTH_COOKIE, CSRF_COOKIE, CSRF_FIELD, Guard

HERE = Path(__file__).resolve().parent
#: Saga ids and dead-letter ids are short printable words; anything else is not found without asking.
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
REFRESH_SECONDS = 10


class Unavailable(Exception):
    """The store or the broker did not answer."""


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return ""
    s = int(now - ts)
    sign = "-" if s < 0 else ""
    s = abs(s)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{sign}{s // size}{unit}"
    return f"{sign}{s}s"


def _backend_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the store or the broker is down (not a bug of ours)."""
    return isinstance(
        exc, StoreError | TransportError | sqlite3.OperationalError | sqlite3.ProgrammingError | ConnectionError
    ) or type(exc).__module__.startswith("psycopg")


class Console:
    """The routes of one console over ``operations``, for the saga types ``sagas``."""

    def __init__(
        self, operations: Operations, *, token: str | None, sagas: Sequence[type[Saga]], clock: Callable[[], float]
    ) -> None:
        self.ops = operations
        self.guard = Guard(token)
        self.definitions = {cls.definition().type: cls.definition() for cls in sagas}
        self.clock = clock
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["iso"] = _iso
        self.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)

    # -- plumbing ------------------------------------------------------------------------------------

    def _read(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (NotFound, ConfigurationError, ActionRefused):
            raise
        except Exception as exc:
            if _backend_error(exc):
                raise Unavailable(str(exc) or type(exc).__name__) from exc
            raise

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        seed = request.cookies.get(CSRF_COOKIE)
        new_seed = None
        if not seed or len(seed) != 64:
            seed = new_seed = self.guard.new_csrf_seed()
        logged_in = self.guard.logged_in(request.cookies.get(AUTH_COOKIE))
        html = self.env.get_template(name).render(
            request_path=request.url.path,
            can_act=self.guard.can_act,
            logged_in=logged_in,
            csrf_field=CSRF_FIELD,
            csrf=self.guard.csrf_token(seed),
            has_bus=self.ops.bus is not None,
            now=self.clock(),
            age=lambda ts: _age(ts, self.clock()),
            **context,
        )
        response = HTMLResponse(html, status_code=status)
        if new_seed is not None:
            response.set_cookie(CSRF_COOKIE, new_seed, httponly=True, samesite="strict")
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def error_page(self, request: Request, status: int, title: str, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        return self.render(request, "error.html", status=status, title=title, detail=message)

    async def form(self, request: Request) -> dict[str, str]:
        """An url-encoded form's fields (first value of each); no multipart parser needed."""
        body = (await request.body()).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def check_form(self, request: Request, form: dict[str, str]) -> None:
        """Refuse (403) a form action without the token login or with a wrong or missing CSRF token."""
        if not self.guard.can_act:
            raise HTTPException(403, "this console is read-only: start it with --token to act")
        if not self.guard.csrf_ok(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page and try again")
        if not self.guard.logged_in(request.cookies.get(AUTH_COOKIE)):
            raise HTTPException(403, "log in with the console's token to act")

    def check_bearer(self, request: Request) -> None:
        if not self.guard.can_act:
            raise HTTPException(403, "this console is read-only: start it with --token to act")
        if not self.guard.bearer_ok(request.headers.get("authorization")):
            raise HTTPException(403, "send the console's token: Authorization: Bearer <token>")

    @staticmethod
    def actor(given: str | None) -> str:
        name = " ".join((given or "").split())[:100]
        return name or "console"

    @staticmethod
    def valid_id(value: str) -> str:
        if not _ID.fullmatch(value):
            raise NotFound(f"no such id {value[:80]!r}")
        return value

    # -- reads ---------------------------------------------------------------------------------------

    def overview_data(self) -> dict[str, Any]:
        counts = self._read(self.ops.counts)
        by_type: dict[str, list[dict[str, Any]]] = {}
        for c in counts:
            by_type.setdefault(c.type, []).append({"state": c.state, "final": c.final, "count": c.count})
        stuck = self._read(lambda: self.ops.sagas(stuck=True, limit=20))
        backlog = self._read(self.ops.outbox_backlog)
        dead: dict[str, Any] | None = None
        if self.ops.bus is not None:
            try:
                letters = self.ops.dead_letters()
                queues: dict[str, int] = {}
                for d in letters:
                    queues[d.queue] = queues.get(d.queue, 0) + 1
                dead = {"count": len(letters), "by_queue": queues, "error": None}
            except Exception as exc:
                if not _backend_error(exc):
                    raise
                dead = {"count": None, "by_queue": {}, "error": str(exc) or type(exc).__name__}
        return {
            "at": self.clock(),
            "counts": by_type,
            "stuck": [r.to_dict() for r in stuck.items],
            "stuck_more": stuck.has_more,
            "outbox": {"unsent": backlog.unsent, "oldest_created_at": backlog.oldest_created_at},
            "dead_letters": dead,
        }

    def list_query(self, request: Request) -> dict[str, Any]:
        q = request.query_params

        def number(name: str, default: int, low: int, high: int) -> int:
            raw = q.get(name, "")
            try:
                value = int(raw) if raw else default
            except ValueError:
                raise ConfigurationError(f"{name} must be a whole number, not {raw[:40]!r}") from None
            return min(max(value, low), high)

        def moment(name: str) -> float | None:
            raw = (q.get(name) or "").strip()
            if not raw:
                return None
            try:
                return float(raw)
            except ValueError:
                pass
            try:
                when = datetime.fromisoformat(raw)
            except ValueError:
                raise ConfigurationError(
                    f"{name} must be an ISO 8601 time such as 2026-11-27T02:40:47Z, or seconds since the epoch"
                ) from None
            return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()

        yes = {"1", "true", "on", "yes"}
        query: dict[str, Any] = {
            "type": q.get("type") or None,
            "state": q.get("state") or None,
            "key": q.get("key") or None,
            "key_prefix": q.get("key_prefix") or None,
            "stuck": q.get("stuck") in yes,
            "failed": q.get("failed") in yes,
            "created_after": moment("since"),
            "created_before": moment("until"),
            "newest_first": q.get("order") == "newest",
            "limit": number("limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        }
        # Pages follow a cursor (fast at any depth); an offset still works when no cursor is given.
        if q.get("cursor"):
            query["cursor"] = q["cursor"]
        else:
            query["offset"] = number("offset", 0, 0, 10**12)
        return query

    def saga_view(self, request: Request) -> Any:
        if "saga_id" in request.path_params:
            saga_id = self.valid_id(request.path_params["saga_id"])
            return self._read(lambda: self.ops.saga(saga_id))
        saga_type, key = request.query_params.get("type", ""), request.query_params.get("key", "")
        if not (saga_type and key):
            raise NotFound("find a saga by its type and key: give both")
        return self._read(lambda: self.ops.saga(type=saga_type, key=key))

    def letters(self) -> list[DeadLetter]:
        if self.ops.bus is None:
            raise ConfigurationError("dead letters need a broker: start the console with --broker")
        return list(self._read(self.ops.dead_letters))

    # -- pages ---------------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        data = self.overview_data()
        return self.render(request, "overview.html", data=data, refresh=REFRESH_SECONDS)

    async def saga_list(self, request: Request) -> Response:
        query = self.list_query(request)
        page = self._read(lambda: self.ops.sagas(**query))
        params = {k: v for k, v in request.query_params.items() if k not in ("offset", "cursor") and v}
        return self.render(
            request,
            "sagas.html",
            page=page,
            query=query,
            types=sorted(self.definitions),
            params=params,
            refresh=REFRESH_SECONDS,
        )

    async def saga_page(self, request: Request) -> Response:
        view = self.saga_view(request)
        definition = self.definitions.get(view.record.type)
        drawn = None
        if definition is not None:
            current = view.record.state if view.record.state in definition.states else None
            drawn = diagram(definition, current, [(h.from_state, h.to_state) for h in view.history])
        return self.render(
            request,
            "saga.html",
            view=view,
            record=view.record,
            diagram=drawn,
            message=self.flash(request),
        )

    async def dead_letters_page(self, request: Request) -> Response:
        letters = self.letters()
        return self.render(request, "dead_letters.html", letters=letters, message=self.flash(request))

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html")

    async def login(self, request: Request) -> Response:
        form = await self.form(request)
        if not self.guard.can_act:
            raise HTTPException(403, "this console is read-only: start it with --token to act")
        if not self.guard.csrf_ok(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page and try again")
        if not self.guard.token_matches(form.get("token")):
            raise HTTPException(403, "wrong token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(AUTH_COOKIE, self.guard.login_cookie(), httponly=True, samesite="strict")
        return response

    async def logout(self, request: Request) -> Response:
        form = await self.form(request)
        if not self.guard.csrf_ok(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page and try again")
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(AUTH_COOKIE)
        return response

    # -- actions -------------------------------------------------------------------------------------

    def do_saga_action(self, action: str, saga_id: str, actor: str) -> dict[str, Any]:
        saga_id = self.valid_id(saga_id)
        act = self.ops.retry if action == "retry" else self.ops.compensate
        result = self._read(lambda: act(saga_id, actor=actor))
        return {
            "saga_id": result.saga_id,
            "action": result.action,
            "actor": result.actor,
            "from_state": result.from_state,
            "to_state": result.to_state,
            "published": [{"type": t, "message_id": m} for t, m in result.published],
            "pending": result.pending,
            "problem": result.problem,
        }

    def do_letter_action(self, action: str, letter_id: str, actor: str) -> dict[str, Any]:
        letter_id = self.valid_id(letter_id)
        if self.ops.bus is None:
            raise ConfigurationError("dead letters need a broker: start the console with --broker")
        if action == "replay":
            replayed = self._read(lambda: self.ops.replay_dead([letter_id], actor=actor))
            if replayed.missing:
                raise NotFound(f"no dead letter {letter_id!r}")
            return {"replayed": replayed.replayed, "kept": replayed.kept, "actor": actor}
        dropped = self._read(lambda: self.ops.drop_dead([letter_id], actor=actor))
        if dropped.missing:
            raise NotFound(f"no dead letter {letter_id!r}")
        return {"dropped": dropped.dropped, "actor": actor}

    async def saga_action(self, request: Request) -> Response:
        form = await self.form(request)
        self.check_form(request, form)
        action, saga_id = request.path_params["action"], request.path_params["saga_id"]
        if action not in {"retry", "compensate"}:
            raise NotFound(f"no action {action[:40]!r}")
        try:
            r = self.do_saga_action(action, saga_id, self.actor(form.get("actor")))
        except ActionRefused as exc:
            return self.error_page(request, 409, f"{action} refused", str(exc))
        note = f"{action} by {r['actor']}: {r['from_state']} → {r['to_state']}"
        if r["pending"]:
            note += f"; {r['pending']} message(s) wait in the outbox for a worker's relay"
        return self.render_after(request, f"/sagas/{saga_id}", note)

    async def letter_action(self, request: Request) -> Response:
        form = await self.form(request)
        self.check_form(request, form)
        action, letter_id = request.path_params["action"], request.path_params["letter_id"]
        if action not in {"replay", "drop"}:
            raise NotFound(f"no action {action[:40]!r}")
        r = self.do_letter_action(action, letter_id, self.actor(form.get("actor")))
        if action == "replay":
            note = f"replayed {letter_id}" if r["replayed"] else f"kept {letter_id}: {r['kept'].get(letter_id, '')}"
        else:
            note = f"dropped {letter_id}"
        return self.render_after(request, "/dead-letters", note)

    def render_after(self, request: Request, path: str, message: str) -> Response:
        """Redirect to ``path`` with ``message`` to show, signed so that no link can make the page say
        anything else."""
        query = urlencode({"message": message, "sig": self.guard.sign_message(message)})
        return RedirectResponse(f"{path}?{query}", status_code=303)

    def flash(self, request: Request) -> str:
        message = request.query_params.get("message", "")
        return message if self.guard.message_ok(message, request.query_params.get("sig")) else ""

    # -- JSON API ------------------------------------------------------------------------------------

    async def api_overview(self, request: Request) -> Response:
        return JSONResponse(self.overview_data())

    async def api_sagas(self, request: Request) -> Response:
        query = self.list_query(request)
        page = self._read(lambda: self.ops.sagas(**query))
        return JSONResponse(
            {
                "items": [r.to_dict() for r in page.items],
                "offset": page.offset,
                "limit": page.limit,
                "has_more": page.has_more,
                "next_offset": page.next_offset,
                "next_cursor": page.next_cursor,
            }
        )

    async def api_saga(self, request: Request) -> Response:
        view = self.saga_view(request)
        out = view.to_dict()
        out["waiting_for"] = view.waiting_for
        out["failure"] = view.failure
        return JSONResponse(out)

    async def api_dead_letters(self, request: Request) -> Response:
        return JSONResponse({"items": [d.to_dict() for d in self.letters()]})

    async def _api_actor(self, request: Request) -> str:
        body = await request.body()
        if not body:
            return "console"
        try:
            data = json.loads(body)
        except ValueError:
            raise ConfigurationError('the body must be JSON, e.g. {"actor": "marie"}') from None
        return self.actor(data.get("actor") if isinstance(data, dict) and isinstance(data.get("actor"), str) else None)

    async def api_saga_action(self, request: Request) -> Response:
        self.check_bearer(request)
        action = request.path_params["action"]
        if action not in {"retry", "compensate"}:
            raise NotFound(f"no action {action[:40]!r}")
        return JSONResponse(self.do_saga_action(action, request.path_params["saga_id"], await self._api_actor(request)))

    async def api_letter_action(self, request: Request) -> Response:
        self.check_bearer(request)
        action = request.path_params["action"]
        if action not in {"replay", "drop"}:
            raise NotFound(f"no action {action[:40]!r}")
        return JSONResponse(
            self.do_letter_action(action, request.path_params["letter_id"], await self._api_actor(request))
        )


def create_app(
    operations: Operations,
    *,
    token: str | None,
    sagas: Sequence[type[Saga]] = (),
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The console over ``operations``: read-only without ``token``; ``sagas`` (the app's saga types)
    give the saga pages their state diagrams."""
    console = Console(operations, token=token, sagas=sagas, clock=clock)

    async def not_found(request: Request, exc: Exception) -> Response:
        return console.error_page(request, 404, "Not found", str(exc))

    async def bad_request(request: Request, exc: Exception) -> Response:
        return console.error_page(request, 400, "Cannot do that", str(exc))

    async def refused(request: Request, exc: Exception) -> Response:
        return console.error_page(request, 409, "Refused", str(exc))

    async def unavailable(request: Request, exc: Exception) -> Response:
        return console.error_page(
            request, 503, "Store or broker unavailable", f"the console cannot read its data now: {exc}"
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = exc.detail if exc.status_code != 404 else "no such page"
        return console.error_page(
            request, exc.status_code, "Not allowed" if exc.status_code == 403 else "Error", detail
        )

    async def other_saga_error(request: Request, exc: Exception) -> Response:
        return console.error_page(request, 500, "Error", str(exc))

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        NotFound: not_found,
        ConfigurationError: bad_request,
        ActionRefused: refused,
        Unavailable: unavailable,
        HTTPException: http_error,
        SagasError: other_saga_error,
    }
    routes = [
        Route("/", console.overview),
        Route("/sagas", console.saga_list),
        Route("/saga", console.saga_page),
        Route("/sagas/{saga_id}", console.saga_page),
        Route("/sagas/{saga_id}/{action}", console.saga_action, methods=["POST"]),
        Route("/dead-letters", console.dead_letters_page),
        Route("/dead-letters/{letter_id}/{action}", console.letter_action, methods=["POST"]),
        Route("/login", console.login_page),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/api/overview", console.api_overview),
        Route("/api/sagas", console.api_sagas),
        Route("/api/saga", console.api_saga),
        Route("/api/sagas/{saga_id}", console.api_saga),
        Route("/api/sagas/{saga_id}/{action}", console.api_saga_action, methods=["POST"]),
        Route("/api/dead-letters", console.api_dead_letters),
        Route("/api/dead-letters/{letter_id}/{action}", console.api_letter_action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers=handlers)
