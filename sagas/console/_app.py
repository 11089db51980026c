"""The console's Starlette app: HTML pages and a JSON API, both thin layers over :class:`Operations`.

Handlers are ``async``; every :class:`Operations` call runs on one worker thread that the console owns
(:meth:`Console.call`), so a slow store or broker never blocks the event loop, and the store connection
and the bus are still used from one thread, one call at a time, as the CLI uses them. The thread stops
when the app shuts down (its lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
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
from ..operations import BULK_CAP, DEAD_ACTIONS, SAGA_ACTIONS, Operations, Overview
from ._bulk import DEAD_FILTER, SAGA_FILTER, BulkActions, known
from ._diagram import diagram
from ._format import age, duration, iso, pretty, preview, relative, stamp
from ._overview import OverviewCache
from ._security import AUTH_COOKIE, CSRF_COOKIE, CSRF_FIELD, Guard

HERE = Path(__file__).resolve().parent
#: Saga ids and dead-letter ids are short printable words; anything else is not found without asking.
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
#: How many dead letters the dead letters page reads to find those of its filter (a bulk action reads more).
DEAD_PAGE_BROWSE = 10_000
#: The most outbox rows a saga's page shows.
OUTBOX_ROWS = 50
REFRESH_SECONDS = 10
#: How long the overview is served from memory: open tabs and auto-refresh do not each query the store.
OVERVIEW_TTL = 2.0
_YES = {"1", "true", "on", "yes"}
_NO = {"", "0", "false", "off", "no"}


def _unset(value: Any) -> bool:
    """Whether a filter field is not given: missing, empty or false (but ``0`` is a value)."""
    return value is None or value is False or value == ""


#: The query string of the saga list (and /api/sagas): its filter, order and paging.
LIST_PARAMS = (*SAGA_FILTER, "order", "limit", "cursor", "offset")


class Unavailable(Exception):
    """The store or the broker did not answer."""


def _backend_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the store or the broker is down (not a bug of ours)."""
    return isinstance(
        exc, StoreError | TransportError | sqlite3.OperationalError | sqlite3.ProgrammingError | ConnectionError
    ) or type(exc).__module__.startswith("psycopg")


class Console:
    """The routes of one console over ``operations``, for the saga types ``sagas``."""

    def __init__(
        self,
        operations: Operations,
        *,
        token: str | None,
        sagas: Sequence[type[Saga]],
        clock: Callable[[], float],
        overview_ttl: float = OVERVIEW_TTL,
    ) -> None:
        self.ops = operations
        self.guard = Guard(token)
        self.overview_ttl = overview_ttl
        #: the one thread every Operations call runs on (see call)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sagas-console-ops")
        self.overview_cache = OverviewCache(operations.overview, ttl=overview_ttl, clock=clock)
        self._overview_read: asyncio.Future[None] | None = None
        self.definitions = {cls.definition().type: cls.definition() for cls in sagas}
        self.clock = clock
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["iso"] = iso
        self.env.filters["duration"] = duration
        self.env.filters["preview"] = preview
        self.env.filters["pretty"] = pretty
        self.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)

    # -- plumbing ------------------------------------------------------------------------------------

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (Operations calls) on the console's worker thread, and wait for it without
        blocking the event loop. A store or broker that fails raises :class:`Unavailable`."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._read, fn)

    def close(self) -> None:
        """Stop the worker thread, once the calls it has queued are done."""
        self.worker.shutdown(wait=True)

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
            age=lambda ts: age(ts, self.clock()),
            relative=lambda ts: relative(ts, self.clock()),
            stamp=lambda text: stamp(text, self.clock()),
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

    async def overview_data(self) -> Overview:
        """The overview from memory, read again in the background once it is due (see
        :mod:`._overview`); the first page, and the first after a background read failed, read it
        themselves (and show the store's error)."""
        cache = self.overview_cache
        if cache.last is None or cache.failure is not None or cache.stale():
            return cast(Overview, await self.call(cache.refresh))
        if cache.due() and (self._overview_read is None or self._overview_read.done()):
            self._overview_read = asyncio.get_running_loop().run_in_executor(self.worker, cache.refresh_quietly)
        return cache.last

    def saga_filter(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The saga filter (arguments of Operations.sagas and .select) of a query string, form or JSON.
        A value that cannot be right (a time, a flag, a type or state the app does not have) is a
        :class:`ConfigurationError` (400), not an empty list that looks like an answer."""

        def text(name: str) -> str | None:
            value = values.get(name)
            return None if _unset(value) else str(value).strip() or None

        def moment(name: str) -> float | None:
            raw = text(name)
            if raw is None:
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

        def flag(name: str) -> bool:
            value = values.get(name)
            word = "" if _unset(value) else str(value).strip().lower()
            if word not in _YES | _NO:
                raise ConfigurationError(f"{name} must be 1 or 0 (true or false), not {word[:40]!r}")
            return word in _YES

        saga_type, state = text("type"), text("state")
        self.check_type_and_state(saga_type, state)
        return {
            "type": saga_type,
            "state": state,
            "key": text("key"),
            "key_prefix": text("key_prefix"),
            "stuck": flag("stuck"),
            "failed": flag("failed"),
            "created_after": moment("since"),
            "created_before": moment("until"),
        }

    def check_type_and_state(self, saga_type: str | None, state: str | None) -> None:
        """Refuse a saga type the app does not declare, or a state its type (or no type) does not have.
        Without the app's saga types (no ``--app``), any name is looked up as given."""
        if not self.definitions:
            return
        if saga_type is not None and saga_type not in self.definitions:
            raise ConfigurationError(
                f"the app has no saga type {saga_type[:60]!r}: its types are {', '.join(sorted(self.definitions))}"
            )
        if state is None:
            return
        chosen = [self.definitions[saga_type]] if saga_type else list(self.definitions.values())
        states = sorted({name for d in chosen for name in d.states})
        if state not in states:
            where = f"saga type {saga_type} has no state" if saga_type else "no saga type of the app has a state"
            raise ConfigurationError(f"{where} {state[:60]!r}: the states are {', '.join(states)}")

    @staticmethod
    def filter_params(values: Mapping[str, Any], fields: Sequence[str]) -> dict[str, str]:
        """The filter fields of ``values`` that are set, as query-string values."""
        return {f: str(values[f]) for f in fields if not _unset(values.get(f))}

    def list_query(self, request: Request) -> dict[str, Any]:
        q = request.query_params

        def number(name: str, default: int, low: int, high: int) -> int:
            raw = q.get(name, "")
            try:
                value = int(raw) if raw else default
            except ValueError:
                raise ConfigurationError(f"{name} must be a whole number, not {raw[:40]!r}") from None
            if not low <= value <= high:
                raise ConfigurationError(f"{name} must be from {low} to {high}, not {value}")
            return value

        known(q, LIST_PARAMS)
        query = self.saga_filter(q)
        order = q.get("order") or "oldest"
        if order not in ("oldest", "newest"):
            raise ConfigurationError(f"order must be oldest or newest, not {order[:40]!r}")
        query["newest_first"] = order == "newest"
        query["limit"] = number("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        # Pages follow a cursor (fast at any depth); an offset still works when no cursor is given.
        if q.get("cursor"):
            query["cursor"] = q["cursor"]
        else:
            query["offset"] = number("offset", 0, 0, 10**12)
        return query

    async def saga_listing(self, request: Request) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """The list's query, its page of sagas, and the last history entry of each (one store query)."""
        query = self.list_query(request)

        def read() -> tuple[Any, dict[str, Any]]:
            page = self.ops.sagas(**query)
            return page, self.ops.last_reasons([r.id for r in page.items])

        page, last = await self.call(read)
        return query, page, last

    async def saga_view(self, request: Request) -> Any:
        if "saga_id" in request.path_params:
            saga_id = self.valid_id(request.path_params["saga_id"])
            return await self.call(lambda: self.ops.saga(saga_id))
        saga_type, key = request.query_params.get("type", ""), request.query_params.get("key", "")
        if not (saga_type and key):
            raise NotFound("find a saga by its type and key: give both")
        return await self.call(lambda: self.ops.saga(type=saga_type, key=key))

    def need_bus(self) -> None:
        if self.ops.bus is None:
            raise ConfigurationError("dead letters need a broker: start the console with --broker")

    async def letters(self, request: Request) -> tuple[dict[str, str], list[DeadLetter]]:
        """The dead-letters filter of the query string, and the letters it matches."""
        self.need_bus()
        known(request.query_params, (*DEAD_FILTER, "message", "sig"))
        wanted = self.filter_params(request.query_params, DEAD_FILTER)
        queue, kind = wanted.get("queue"), wanted.get("error_type")
        selection = await self.call(
            lambda: self.ops.select_dead(queue=queue, kind=kind, cap=MAX_LIMIT, browse=DEAD_PAGE_BROWSE)
        )
        return wanted, list(selection.items)

    # -- pages ---------------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        data = await self.overview_data()
        return self.render(request, "overview.html", data=data, refresh=REFRESH_SECONDS)

    async def saga_list(self, request: Request) -> Response:
        query, page, last = await self.saga_listing(request)
        params = {k: v for k, v in request.query_params.items() if k not in ("offset", "cursor") and v}
        return self.render(
            request,
            "sagas.html",
            page=page,
            last=last,
            query=query,
            types=sorted(self.definitions),
            params=params,
            bulk_params=self.filter_params(request.query_params, SAGA_FILTER),
            refresh=REFRESH_SECONDS,
        )

    async def saga_page(self, request: Request) -> Response:
        view = await self.saga_view(request)
        outbox = await self.call(lambda: self.ops.outbox(view.record.id, OUTBOX_ROWS))
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
            outbox=outbox,
            outbox_limit=OUTBOX_ROWS,
            diagram=drawn,
            compensable=definition is not None and definition.compensable_from(view.record.state),
            message=self.flash(request),
        )

    async def dead_letters_page(self, request: Request) -> Response:
        wanted, letters = await self.letters(request)
        return self.render(
            request,
            "dead_letters.html",
            letters=letters,
            wanted=wanted,
            limit=MAX_LIMIT,
            message=self.flash(request),
        )

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html")

    async def login(self, request: Request) -> Response:
        form = await self.form(request)
        if not self.guard.can_act:
            raise HTTPException(403, "this console is read-only: start it with --token to act")
        if not self.guard.csrf_ok(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page and try again")
        if not self.guard.token_matches(form.get("token")):
            return self.render(request, "login.html", status=403, problem="wrong token: try again")
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

    # -- actions (forms and API share them) ----------------------------------------------------------

    async def authorize(
        self, request: Request, allowed: Sequence[str], *, api: bool
    ) -> tuple[str, str, dict[str, Any]]:
        """Check who asks (a bearer token for the API; the login and the CSRF token for a form) and the
        action's name; return the action, who acts, and the body's fields (form or JSON object)."""
        if api:
            self.check_bearer(request)
            fields = await self.json_body(request)
        else:
            fields = dict(await self.form(request))
            self.check_form(request, fields)
        action = request.path_params["action"]
        if action not in allowed:
            raise NotFound(f"no action {action[:40]!r}")
        given = fields.get("actor")
        return action, self.actor(given if isinstance(given, str) else None), fields

    async def do_saga_action(self, action: str, saga_id: str, actor: str) -> dict[str, Any]:
        saga_id = self.valid_id(saga_id)
        act = self.ops.retry if action == "retry" else self.ops.compensate
        result = await self.call(lambda: act(saga_id, actor=actor))
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

    async def do_letter_action(self, action: str, letter_id: str, actor: str) -> dict[str, Any]:
        letter_id = self.valid_id(letter_id)
        self.need_bus()
        if action == "replay":
            replayed = await self.call(lambda: self.ops.replay_dead([letter_id], actor=actor))
            if replayed.missing:
                raise NotFound(f"no dead letter {letter_id!r}")
            return {"replayed": replayed.replayed, "kept": replayed.kept, "actor": actor}
        dropped = await self.call(lambda: self.ops.drop_dead([letter_id], actor=actor))
        if dropped.missing:
            raise NotFound(f"no dead letter {letter_id!r}")
        return {"dropped": dropped.dropped, "actor": actor}

    async def saga_action(self, request: Request) -> Response:
        api = request.url.path.startswith("/api/")
        action, actor, _ = await self.authorize(request, SAGA_ACTIONS, api=api)
        saga_id = request.path_params["saga_id"]
        r = await self.do_saga_action(action, saga_id, actor)
        if api:
            return JSONResponse(r)
        note = f"{action} by {r['actor']}: {r['from_state']} → {r['to_state']}"
        if r["pending"]:
            note += f"; {r['pending']} message(s) wait in the outbox for a worker's relay"
        return self.render_after(request, f"/sagas/{saga_id}", note)

    async def letter_action(self, request: Request) -> Response:
        api = request.url.path.startswith("/api/")
        action, actor, _ = await self.authorize(request, DEAD_ACTIONS, api=api)
        letter_id = request.path_params["letter_id"]
        r = await self.do_letter_action(action, letter_id, actor)
        if api:
            return JSONResponse(r)
        if action == "replay":
            note = (
                f"replayed {letter_id} (by {r['actor']})"
                if r["replayed"]
                else f"kept {letter_id}: {r['kept'].get(letter_id, '')}"
            )
        else:
            note = f"dropped {letter_id} (by {r['actor']})"
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
        data = await self.overview_data()
        return JSONResponse(data.to_dict())

    async def api_sagas(self, request: Request) -> Response:
        _, page, last = await self.saga_listing(request)
        items = []
        for r in page.items:
            item = r.to_dict()
            entry = last.get(r.id)
            item["last_reason"] = entry.reason if entry is not None else None
            items.append(item)
        return JSONResponse(
            {
                "items": items,
                "offset": page.offset,
                "limit": page.limit,
                "has_more": page.has_more,
                "next_offset": page.next_offset,
                "next_cursor": page.next_cursor,
            }
        )

    async def api_saga(self, request: Request) -> Response:
        view = await self.saga_view(request)
        outbox = await self.call(lambda: self.ops.outbox(view.record.id, OUTBOX_ROWS))
        out = view.to_dict()
        out["waiting_for"] = view.waiting_for
        out["failure"] = view.failure
        out["outbox"] = [
            {
                "id": o.row.id,
                "message_id": o.row.message_id,
                "routing_key": o.row.routing_key,
                "created_at": o.row.created_at,
                "sent_at": o.sent_at,
                "body": o.row.body,
            }
            for o in outbox
        ]
        return JSONResponse(out)

    async def api_dead_letters(self, request: Request) -> Response:
        _, letters = await self.letters(request)
        return JSONResponse({"items": [d.to_dict() for d in letters]})

    async def json_body(self, request: Request) -> dict[str, Any]:
        """The JSON object of a request's body ({} when empty)."""
        body = await request.body()
        if not body:
            return {}
        try:
            data = json.loads(body)
        except ValueError:
            raise ConfigurationError('the body must be JSON, e.g. {"actor": "marie"}') from None
        if not isinstance(data, dict):
            raise ConfigurationError('the body must be a JSON object, e.g. {"actor": "marie"}')
        return data


def create_app(
    operations: Operations,
    *,
    token: str | None,
    sagas: Sequence[type[Saga]] = (),
    clock: Callable[[], float] = time.time,
    overview_ttl: float = OVERVIEW_TTL,
    bulk_cap: int = BULK_CAP,
) -> Starlette:
    """The console over ``operations``: read-only without ``token``; ``sagas`` (the app's saga types)
        give the saga pages their state diagrams; the overview is read at most every ``overview_ttl``
        seconds; a bulk action touches at most ``bulk_cap`` sagas or dead letters (more matching is refused:
    narrow the filter). ``app.state.console`` is the :class:`Console`."""
    console = Console(operations, token=token, sagas=sagas, clock=clock, overview_ttl=overview_ttl)
    bulk = BulkActions(console, cap=bulk_cap)

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
        Route("/sagas/bulk/{action}", bulk.saga_confirm),
        Route("/sagas/bulk/{action}", bulk.saga_bulk, methods=["POST"]),
        Route("/sagas/{saga_id}", console.saga_page),
        Route("/sagas/{saga_id}/{action}", console.saga_action, methods=["POST"]),
        Route("/dead-letters", console.dead_letters_page),
        Route("/dead-letters/bulk/{action}", bulk.letter_confirm),
        Route("/dead-letters/bulk/{action}", bulk.letter_bulk, methods=["POST"]),
        Route("/dead-letters/{letter_id}/{action}", console.letter_action, methods=["POST"]),
        Route("/login", console.login_page),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/api/overview", console.api_overview),
        Route("/api/sagas", console.api_sagas),
        Route("/api/saga", console.api_saga),
        Route("/api/sagas/bulk/{action}", bulk.saga_confirm),
        Route("/api/sagas/bulk/{action}", bulk.saga_bulk, methods=["POST"]),
        Route("/api/sagas/{saga_id}", console.api_saga),
        Route("/api/sagas/{saga_id}/{action}", console.saga_action, methods=["POST"]),
        Route("/api/dead-letters", console.api_dead_letters),
        Route("/api/dead-letters/bulk/{action}", bulk.letter_confirm),
        Route("/api/dead-letters/bulk/{action}", bulk.letter_bulk, methods=["POST"]),
        Route("/api/dead-letters/{letter_id}/{action}", console.letter_action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            console.close()

    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.console = console
    return app
