"""A saga type's state diagram as plain data for a template: its states in the order a saga meets them
(breadth first from the start states), each edge with its labels, the current state and the states
this saga went through marked. Drawn from the same edges as ``sagas graph`` (sagas._graph)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .._graph import edges
from .._saga import SagaDefinition


@dataclass(frozen=True, slots=True)
class StateBox:
    name: str
    final: bool
    current: bool
    visited: bool
    start: bool


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    dest: str
    labels: list[str]
    taken: bool


@dataclass(frozen=True, slots=True)
class Diagram:
    type: str
    states: list[StateBox]
    edges: list[Edge]


def diagram(definition: SagaDefinition, current: str | None, path: Iterable[tuple[str, str]] = ()) -> Diagram:
    """The diagram of ``definition`` with ``current`` highlighted and the moves in ``path`` marked taken."""
    all_edges = edges(definition)
    starts = list(dict.fromkeys(s.to for s in definition.starts.values()))
    order: list[str] = []
    queue = [s for s in starts if s in definition.states]
    while queue:
        name = queue.pop(0)
        if name in order:
            continue
        order.append(name)
        queue.extend(dst for src, dst, _ in all_edges if src == name and dst not in order)
    order += [n for n in definition.states if n not in order]
    taken = set(path)
    visited = {s for pair in taken for s in pair} | ({current} if current else set())
    return Diagram(
        definition.type,
        [StateBox(n, definition.states[n].final, n == current, n in visited, n in starts) for n in order],
        [Edge(src, dst, labels, (src, dst) in taken) for src, dst, labels in all_edges],
    )
