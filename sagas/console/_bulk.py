"""Bulk actions of the console: retry or compensate every saga a list filter matches, and replay or drop
every dead letter of a queue and error type, in pages and in the JSON API.

A bulk action is two steps. The first (GET) counts what the filter matches, up to a cap, and shows it
with a Confirm form carrying that count (the API gives the count as JSON). The second (POST) selects again
with the same filter and acts only if the count is still the one confirmed: otherwise it shows the new
count to confirm (409 on the API). Each saga's action is recorded in its history with who acted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._errors import ConfigurationError, NotFound
from ..operations import BULK_CAP, DEAD_ACTIONS, SAGA_ACTIONS, Selection

if TYPE_CHECKING:
    from ._app import Console

#: The filter fields of the saga list (and of the bulk actions over it), as in its query string.
SAGA_FILTER = ("type", "state", "key", "key_prefix", "stuck", "failed", "since", "until")
#: The filter fields of the dead letters page.
DEAD_FILTER = ("queue", "error_type")
#: How many of the matches the confirmation page lists.
SAMPLE = 10
_LABELS = {
    "type": "type",
    "state": "state",
    "key": "key",
    "key_prefix": "key starting with",
    "since": "created since",
    "until": "created before",
    "queue": "queue",
    "error_type": "error type",
}


def describe(params: Mapping[str, str]) -> str:
    """A filter in words: "type postprocessing, state scanning, stuck"."""
    parts = [
        name if name in ("stuck", "failed") else f"{_LABELS.get(name, name)} {value}" for name, value in params.items()
    ]
    return ", ".join(parts) or "no filter: every one"


def known(values: Mapping[str, Any], names: Sequence[str], *, what: str = "parameter") -> None:
    """Refuse a field that is not one of ``names``: a misspelt filter must not select everything."""
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigurationError(f"unknown {what} {unknown[0][:40]!r}: use {', '.join(names)}")


def _page_of(noun: str) -> str:
    """The page a bulk action over ``noun`` ("sagas" or "dead letters") belongs to."""
    return "/sagas" if noun == "sagas" else "/dead-letters"


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _expected(value: Any) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            "say how many the action should touch (expected_count, as the confirmation counted): "
            "it acts only if the filter still matches that many"
        ) from None
    if count < 0:
        raise ConfigurationError("expected_count must be 0 or more")
    return count


class BulkActions:
    """The bulk routes of one :class:`Console` (pages under /sagas/bulk and /dead-letters/bulk, and
    the same under /api/)."""

    def __init__(self, console: Console, cap: int = BULK_CAP) -> None:
        self.console = console
        self.cap = cap

    # -- sagas ---------------------------------------------------------------------------------------

    async def saga_confirm(self, request: Request) -> Response:
        action = self._action(request, SAGA_ACTIONS)
        known(request.query_params, SAGA_FILTER)
        params = self.console.filter_params(request.query_params, SAGA_FILTER)
        selection = await self._select_sagas(params)
        return self._confirm(request, "sagas", action, params, selection)

    async def saga_bulk(self, request: Request) -> Response:
        action, actor, fields = await self.console.authorize(request, SAGA_ACTIONS, api=_is_api(request))
        params, expected = self._posted(request, fields, SAGA_FILTER)
        query = self.console.saga_filter(params)
        ops = self.console.ops

        def run() -> tuple[Selection[Any], Any]:
            # select and act in one call of the worker thread: no other console call runs in between
            selection = ops.select(cap=self.cap, **query)
            if selection.over_cap or selection.count != expected:
                return selection, None
            return selection, ops.bulk(action, [r.id for r in selection.items], actor=actor)

        selection, result = await self.console.call(run)
        if result is None:
            return self._confirm(request, "sagas", action, params, selection, expected=expected)
        out = result.to_dict()
        if _is_api(request):
            return JSONResponse(out)
        return self._result(request, "sagas", action, actor, params, out["done"], out["refused_by_reason"])

    async def _select_sagas(self, params: Mapping[str, str]) -> Selection[Any]:
        query = self.console.saga_filter(params)
        selection: Selection[Any] = await self.console.call(lambda: self.console.ops.select(cap=self.cap, **query))
        return selection

    # -- dead letters --------------------------------------------------------------------------------

    async def letter_confirm(self, request: Request) -> Response:
        action = self._action(request, DEAD_ACTIONS)
        self.console.need_bus()
        known(request.query_params, DEAD_FILTER)
        params = self.console.filter_params(request.query_params, DEAD_FILTER)
        queue, kind = params.get("queue"), params.get("error_type")
        selection = await self.console.call(lambda: self.console.ops.select_dead(queue=queue, kind=kind, cap=self.cap))
        return self._confirm(request, "dead letters", action, params, selection)

    async def letter_bulk(self, request: Request) -> Response:
        action, actor, fields = await self.console.authorize(request, DEAD_ACTIONS, api=_is_api(request))
        self.console.need_bus()
        params, expected = self._posted(request, fields, DEAD_FILTER)
        queue, kind = params.get("queue"), params.get("error_type")
        ops = self.console.ops

        def run() -> tuple[Selection[Any], dict[str, Any] | None]:
            selection = ops.select_dead(queue=queue, kind=kind, cap=self.cap)
            if selection.over_cap or selection.count != expected:
                return selection, None
            ids = [d.id for d in selection.items]
            refused: dict[str, str] = {}
            if action == "replay":
                replayed = ops.replay_dead(ids, actor=actor)
                done, refused = replayed.replayed, dict(replayed.kept)
                missing = replayed.missing
            else:
                dropped = ops.drop_dead(ids, actor=actor)
                done, missing = dropped.dropped, dropped.missing
            for letter_id in missing:
                refused[letter_id] = "no longer in the dead-letter queue (replayed or dropped meanwhile)"
            return selection, {"action": action, "actor": actor, "done": done, "refused": refused}

        selection, out = await self.console.call(run)
        if out is None:
            return self._confirm(request, "dead letters", action, params, selection, expected=expected)
        groups: dict[str, list[str]] = {}
        for letter_id, why in out["refused"].items():
            groups.setdefault(why, []).append(letter_id)
        out["refused_by_reason"] = groups
        if _is_api(request):
            return JSONResponse(out)
        return self._result(request, "dead letters", action, actor, params, out["done"], groups)

    # -- shared --------------------------------------------------------------------------------------

    @staticmethod
    def _action(request: Request, allowed: Sequence[str]) -> str:
        action = str(request.path_params["action"])
        if action not in allowed:
            raise NotFound(f"no action {action[:40]!r}")
        return action

    def _posted(self, request: Request, fields: Mapping[str, Any], names: Sequence[str]) -> tuple[dict[str, str], int]:
        """The filter and the confirmed count of a bulk POST: form fields, or the API's JSON
        ``{"filter": {...}, "expected_count": N}``."""
        if _is_api(request):
            raw = fields.get("filter") or {}
            if not isinstance(raw, dict):
                raise ConfigurationError('"filter" must be a JSON object, e.g. {"type": "postprocessing"}')
            known(raw, names, what="filter field")
            return self.console.filter_params(raw, names), _expected(fields.get("expected_count"))
        return self.console.filter_params(fields, names), _expected(fields.get("expected"))

    def _confirm(
        self,
        request: Request,
        noun: str,
        action: str,
        params: dict[str, str],
        selection: Selection[Any],
        *,
        expected: int | None = None,
    ) -> Response:
        """The confirmation (its JSON on the API): how many the action would touch, and the first few.
        409 when more than the cap match, or (``expected``: the count confirmed) when another number does."""
        changed = expected is not None
        status = 409 if selection.over_cap or changed else 200
        if selection.over_cap:
            problem = f"more than {self.cap:,} {noun} match; narrow the filter"
        elif changed:
            problem = (
                f"{selection.count} {noun} match this filter, not the {expected} confirmed (the selection "
                "changed, or the count sent was another): check them and confirm again"
            )
        else:
            problem = None
        if _is_api(request):
            body: dict[str, Any] = {
                "action": action,
                "filter": params,
                "count": None if selection.over_cap else selection.count,
                "over_cap": selection.over_cap,
                "cap": self.cap,
                "ids": [item.id for item in selection.items[:SAMPLE]],
            }
            if problem:
                body["error"] = problem
            return JSONResponse(body, status_code=status)
        base = _page_of(noun)
        return self.console.render(
            request,
            "bulk_confirm.html",
            status=status,
            noun=noun,
            action=action,
            params=params,
            described=describe(params),
            selection=selection,
            sample=selection.items[:SAMPLE],
            cap=self.cap,
            problem=problem,
            post_url=f"{base}/bulk/{action}",
            back_url=f"{base}?{urlencode(params)}",
        )

    def _result(
        self,
        request: Request,
        noun: str,
        action: str,
        actor: str,
        params: dict[str, str],
        done: list[str],
        refused: dict[str, list[str]],
    ) -> Response:
        base = _page_of(noun)
        return self.console.render(
            request,
            "bulk_result.html",
            noun=noun,
            action=action,
            actor=actor,
            described=describe(params),
            done=done,
            refused=refused,
            back_url=f"{base}?{urlencode(params)}",
        )
