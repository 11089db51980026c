"""Definition versions: each saga type's compiled graph has a fingerprint, and a deploy is checked
against the live sagas in the store before a worker runs it.

The **graph** of a definition is what a saga in flight depends on: its states (and which are final),
the request each state sends, the transitions (trigger, source, destination), the requests it can
send, and its start and correlated events. Guards, actions and payload builders are code, not graph:
they are left out (a change to them cannot strand a saga). The **fingerprint** is the SHA-256 of the
graph's canonical JSON: the same in every process and Python version.

:func:`check` compares an app's definitions with the live sagas, counted by type, state, fingerprint
and the request each waits on (:meth:`Store.live_groups`), and names the groups a deploy would
strand (see docs/upgrades.md):

- ``state-removed``: the state no longer exists (and no migration moves sagas out of it);
- ``request-changed``: the saga waits for a reply to a request its state no longer sends;
- ``request-unhandled``: the saga waits for a reply to a request its state still sends, but nothing
  handles it any more: no handler of the app, no queue of another app's latest registration in the
  store's queue registry, while a registered queue did receive it (see
  :class:`sagas._queues.RequestRoutes`; without that evidence it is not judged);
- ``no-way-out``: the state became final, or (when the store keeps the old graph) none of the
  triggers that moved a saga out of it, but its deadline and an operator's compensate, is left;
- ``type-removed``: a saga type the app does not define (unless the store is shared with other apps,
  which run their own types: ``shared_store``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ._errors import SagasError
from ._protocol import COMPENSATE, TIMEOUT
from ._saga import FAILED, SagaDefinition
from ._store import HistoryEntry, LiveGroup, Store

log = structlog.get_logger("sagas.versions")

#: What strands a group of sagas (:attr:`Stranded.kind`).
STATE_REMOVED = "state-removed"
REQUEST_CHANGED = "request-changed"
REQUEST_UNHANDLED = "request-unhandled"
NO_WAY_OUT = "no-way-out"
TYPE_REMOVED = "type-removed"

#: How many ids of a stranded group the report names.
EXAMPLES = 3
#: the transitions that leave a state however the definition changed: they do not count as a way out
_ALWAYS = {TIMEOUT.name, COMPENSATE.name}


def graph(d: SagaDefinition) -> dict[str, Any]:
    """The definition's graph, as plain JSON values in a canonical order (see the module's docstring)."""
    states = {}
    for name in sorted(d.states):
        spec = d.states[name].request_spec
        states[name] = {"final": d.states[name].final, "sends": None if spec is None else spec.type}
    transitions = sorted({(t.trigger.name, t.source, t.dest) for t in d.transitions})
    out: dict[str, Any] = {
        "type": d.type,
        "states": states,
        "transitions": [list(t) for t in transitions],
        "requests": sorted(d.requests),
        "starts": {event: d.starts[event].to for event in sorted(d.starts)},
        "correlate": {event: d.correlate[event] for event in sorted(d.correlate)},
    }
    if d.data_version is not None:
        out["data_version"] = d.data_version
    return out


def graph_json(d: SagaDefinition) -> str:
    """The graph's canonical JSON text: sorted keys, no spaces, ASCII."""
    return json.dumps(graph(d), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(d: SagaDefinition) -> str:
    """The SHA-256 (hex) of the definition's canonical graph JSON."""
    return hashlib.sha256(graph_json(d).encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class Stranded:
    """A group of live sagas a deploy would strand: how many, some of their ids, and why."""

    group: LiveGroup
    kind: str
    why: str
    examples: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        g = self.group
        return {
            "type": g.type,
            "state": g.state,
            "fingerprint": g.fingerprint,
            "awaits": g.awaits,
            "count": g.count,
            "kind": self.kind,
            "why": self.why,
            "examples": list(self.examples),
        }

    def line(self) -> str:
        g = self.group
        ids = ", ".join(self.examples) + (", ..." if g.count > len(self.examples) else "")
        return f"{g.type}/{g.state}: {g.count} saga(s) ({ids}): {self.why}"


@dataclass(frozen=True, slots=True)
class Migrating:
    """A group of live sagas a worker will migrate to ``to`` when it loads them."""

    group: LiveGroup
    to: str


@dataclass(slots=True)
class CompatibilityReport:
    """What :func:`check` found: the stranded groups (a deploy must not go on while there are any), the
    groups a migration moves, and the live sagas of types this app does not run on a shared store."""

    stranded: list[Stranded] = field(default_factory=list)
    migrating: list[Migrating] = field(default_factory=list)
    others: list[LiveGroup] = field(default_factory=list)
    live: int = 0

    @property
    def compatible(self) -> bool:
        return not self.stranded

    def lines(self) -> list[str]:
        out = [
            f"{len(self.stranded)} group(s) of live sagas would be stranded:"
            if self.stranded
            else f"compatible: none of the {self.live} live saga(s) would be stranded"
        ]
        out += [f"  STRANDED {s.line()}" for s in self.stranded]
        out += [f"  migrates {m.group.type}/{m.group.state} -> {m.to}: {m.group.count} saga(s)" for m in self.migrating]
        out += [f"  not this app's (shared store) {g.type}/{g.state}: {g.count} saga(s)" for g in self.others]
        if self.stranded:
            out.append(
                "fix the definitions (keep the state, the request's handler or the saga type until its sagas have "
                "left it, or add a migration for a state: see docs/upgrades.md), or start with --allow-stranded to "
                "park them in 'failed'"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "compatible": self.compatible,
            "live": self.live,
            "stranded": [s.to_dict() for s in self.stranded],
            "migrating": [
                {"type": m.group.type, "state": m.group.state, "to": m.to, "count": m.group.count}
                for m in self.migrating
            ],
            "others": [{"type": g.type, "state": g.state, "count": g.count} for g in self.others],
        }


class StrandedSagas(SagasError):
    """A worker refused to start: its definitions would strand live sagas (exit code 4)."""

    def __init__(self, report: CompatibilityReport) -> None:
        super().__init__("; ".join(s.line() for s in report.stranded))
        self.report = report


def check(
    definitions: Mapping[str, SagaDefinition],
    store: Store,
    *,
    shared_store: bool = False,
    unhandled: Callable[[str], str | None] | None = None,
) -> CompatibilityReport:
    """Compare ``definitions`` (saga type -> definition) with the live sagas in ``store``.

    With ``shared_store``, several apps share the store: live sagas of a type these definitions do not
    have belong to another app, and are listed, not judged. Without it, they are stranded.

    ``unhandled(request_type)`` says why nothing handles a request type any more, or None when something
    may (:meth:`sagas._queues.RequestRoutes.unhandled`); without it, whether requests are handled is not
    judged."""
    report = CompatibilityReport()
    old_graphs: dict[tuple[str, str], dict[str, Any] | None] = {}
    for g in store.live_groups():
        report.live += g.count
        d = definitions.get(g.type)
        if d is None:
            if shared_store:
                report.others.append(g)
            else:
                why = (
                    f"saga type {g.type!r} is not defined by this app: no worker moves these sagas (add the type "
                    "back until they ended, or pass --shared-store if another app runs it)"
                )
                report.stranded.append(Stranded(g, TYPE_REMOVED, why))
            continue
        if g.state not in d.states:
            if g.state in d.migrations:
                report.migrating.append(Migrating(g, d.migrations[g.state]))
            else:
                why = f"state {g.state!r} no longer exists (keep it until these sagas ended, or migrate it)"
                report.stranded.append(Stranded(g, STATE_REMOVED, why))
            continue
        state = d.states[g.state]
        spec = state.request_spec
        if state.final:
            why = f"state {g.state!r} is final now: these sagas would never move or end"
            report.stranded.append(Stranded(g, NO_WAY_OUT, why))
            continue
        if g.awaits is not None and (spec is None or spec.type != g.awaits):
            sends = "no request" if spec is None else spec.type
            why = (
                f"they wait for the reply to {g.awaits}, which state {g.state!r} no longer sends (it sends "
                f"{sends}): the reply would move nothing (give the new request a new state, and migrate)"
            )
            report.stranded.append(Stranded(g, REQUEST_CHANGED, why))
            continue
        nobody = None if g.awaits is None or unhandled is None else unhandled(g.awaits)
        if nobody is not None:
            why = f"they wait for the reply to {g.awaits}, which state {g.state!r} sends, but {nobody}"
            report.stranded.append(Stranded(g, REQUEST_UNHANDLED, why))
            continue
        if g.fingerprint is not None and g.fingerprint != d.fingerprint:
            key = (g.type, g.fingerprint)
            if key not in old_graphs:
                stored = store.definition_graph(g.type, g.fingerprint)
                old_graphs[key] = None if stored is None else json.loads(stored)
            lost = _ways_out_gone(old_graphs[key], d, g.state)
            if lost:
                why = (
                    f"none of the ways out of state {g.state!r} it had ({', '.join(lost)}) is left: only its "
                    "deadline moves these sagas"
                )
                report.stranded.append(Stranded(g, NO_WAY_OUT, why))
    report.stranded = [_with_examples(store, s) for s in report.stranded]
    return report


def _ways_out_gone(old: dict[str, Any] | None, d: SagaDefinition, state: str) -> list[str]:
    """The triggers that moved a saga out of ``state`` in the ``old`` graph (but its deadline and an
    operator's compensate), when none of them does in ``d``; [] otherwise, or when the old graph is unknown."""
    if old is None:
        return []
    before = sorted({t[0] for t in old.get("transitions", ()) if t[1] == state} - _ALWAYS)
    now = {t.trigger.name for t in d.transitions if t.source == state}
    return before if before and not set(before) & now else []


def _matching(store: Store, g: LiveGroup, limit: int | None) -> Iterable[Any]:
    """The live sagas of group ``g``, oldest first (up to ``limit``)."""
    found = 0
    after: tuple[float, str] | None = None
    while True:
        page = store.list_sagas(g.type, g.state, limit=500, after=after)
        for r in page:
            awaits = (r.meta.get("request") or {}).get("type")
            if not r.final and r.fingerprint == g.fingerprint and awaits == g.awaits:
                yield r
                found += 1
                if limit is not None and found >= limit:
                    return
        if len(page) < 500:
            return
        after = (page[-1].created_at, page[-1].id)


def _with_examples(store: Store, s: Stranded) -> Stranded:
    examples = tuple(r.id for r in _matching(store, s.group, EXAMPLES))
    return Stranded(s.group, s.kind, s.why, examples)


def park(report: CompatibilityReport, store: Store, now: float, *, message_id: str = "deploy") -> int:
    """Park every saga of the report's stranded groups in ``failed``, with the reason in its history
    (``--allow-stranded``). Returns how many were parked; one that moved meanwhile is left alone."""
    from ._store import VersionConflict

    parked = 0
    for s in report.stranded:
        for record in list(_matching(store, s.group, None)):
            previous = record.state
            reason = f"stranded by a deploy, parked (--allow-stranded): {s.why}"
            record.version += 1
            record.state, record.final, record.deadline, record.attempts = FAILED, True, None, 0
            record.meta = {**record.meta, "request": None, "failed_from": previous, "reason": reason}
            record.updated_at = now
            history = HistoryEntry(now, f"{message_id}:{record.id}", previous, FAILED, reason)
            try:
                with store.group():
                    store.save_saga(record, expected_version=record.version - 1, history=history, inbox=None, outbox=[])
            except VersionConflict:
                continue
            parked += 1
            log.warning("saga.stranded", saga_id=record.id, saga_type=record.type, state=previous, kind=s.kind)
    return parked


def record_definitions(definitions: Iterable[SagaDefinition], store: Store, now: float) -> None:
    """Keep each definition's graph under its fingerprint in the store (once), so that a later check can
    say what changed."""
    with store.group():
        for d in definitions:
            store.save_definition(d.type, d.fingerprint, graph_json(d), now)
