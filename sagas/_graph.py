"""State diagrams of saga types, as Mermaid (``stateDiagram-v2``) or Graphviz DOT text.

The diagram is drawn from a compiled :class:`~sagas._saga.SagaDefinition`: its states and its
transitions, one edge per pair of states labelled with what moves the saga along it (every state that
has not ended has its ``timeout`` edge, to its ``on_timeout`` or to ``failed``). Start events point at
their states; final states are marked.

The text is written here rather than by ``transitions.extensions.GraphMachine``: its Mermaid output
(transitions 0.9.3) starts with a title block, writes ``a --> b: label`` with the raw trigger
(``reply:ocis.antivirus.scan``), marks the model's state as active, does not mark final states, and
needs a model object to hang trigger methods on; its DOT output needs the ``graphviz`` package.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ._saga import SagaDefinition, Transition

FORMATS = ("mermaid", "dot")
#: Words the Mermaid state-diagram grammar treats as keywords: never used as a state id.
_MERMAID_RESERVED = {
    "as",
    "class",
    "classdef",
    "click",
    "default",
    "direction",
    "end",
    "left",
    "note",
    "of",
    "right",
    "state",
    "style",
}
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_]")
#: Characters kept in a Mermaid label; anything else (':' ';' '#' quotes, brackets...) becomes a space.
_UNSAFE_LABEL = re.compile(r"[^A-Za-z0-9_ .,/()+-]")


def trigger_label(t: Transition) -> str:
    """A readable label for a transition: ``reply ocis.antivirus.scan if _infected``."""
    kind, what = t.trigger.kind.value, t.trigger.subject
    label = f"{kind} {what}" if what else kind
    if t.guard is not None:
        name = getattr(t.guard, "__name__", "")
        label += f" if {name}" if name.isidentifier() else " if guard"
    return label


def edges(definition: SagaDefinition) -> list[tuple[str, str, list[str]]]:
    """The diagram's edges ``(source, dest, labels)``, in definition order, one per pair of states."""
    pairs: dict[tuple[str, str], list[str]] = {}
    for t in definition.transitions:
        labels = pairs.setdefault((t.source, t.dest), [])
        label = trigger_label(t)
        if label not in labels:
            labels.append(label)
    return [(src, dst, labels) for (src, dst), labels in pairs.items()]


def mermaid_ids(states: Iterable[str]) -> dict[str, str]:
    """A Mermaid id for each state name: the name itself when it is a plain word, else a sanitised one,
    made unique (``a-b`` -> ``a_b``, then ``a_b_2``...). Stable for a given order of states."""
    names = list(states)
    plain = {n for n in names if _is_plain(n)}
    ids: dict[str, str] = {}
    used: set[str] = set(plain)
    for name in names:
        if name in plain:
            ids[name] = name
            continue
        base = _UNSAFE_ID.sub("_", name) or "state"
        if base[0].isdigit() or base.lower() in _MERMAID_RESERVED:
            base = f"s_{base}"
        candidate, n = base, 2
        while candidate in used:
            candidate, n = f"{base}_{n}", n + 1
        used.add(candidate)
        ids[name] = candidate
    return ids


def _is_plain(name: str) -> bool:
    return (
        bool(name) and not _UNSAFE_ID.search(name) and not name[0].isdigit() and name.lower() not in _MERMAID_RESERVED
    )


def mermaid_label(text: str) -> str:
    """Label text Mermaid accepts after ``:``: no ':' (it ends the label), no ';' '#' quotes or brackets."""
    return " ".join(_UNSAFE_LABEL.sub(" ", text).split())


def draw(definition: SagaDefinition, fmt: str = "mermaid", current: str | None = None) -> str:
    """The state diagram of ``definition`` as Mermaid or DOT text; ``current`` highlights a state."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown diagram format {fmt!r}: use one of {', '.join(FORMATS)}")
    if current is not None and current not in definition.states:
        raise ValueError(f"saga type {definition.type} has no state {current!r}")
    return _mermaid(definition, current) if fmt == "mermaid" else _dot(definition, current)


def _start_states(definition: SagaDefinition) -> list[str]:
    return list(dict.fromkeys(s.to for s in definition.starts.values()))


def _mermaid(definition: SagaDefinition, current: str | None) -> str:
    ids = mermaid_ids(definition.states)
    lines = ["stateDiagram-v2"]
    for name in definition.states:
        sid = ids[name]
        if sid == name:
            lines.append(f"    {sid}")
        else:
            lines.append(f'    state "{mermaid_label(name) or sid}" as {sid}')
    for to in _start_states(definition):
        lines.append(f"    [*] --> {ids[to]}")
    for src, dst, labels in edges(definition):
        label = mermaid_label(", ".join(labels))
        lines.append(f"    {ids[src]} --> {ids[dst]}" + (f" : {label}" if label else ""))
    for name, st in definition.states.items():
        if st.final:
            lines.append(f"    {ids[name]} --> [*]")
    if current is not None:
        lines.append("    classDef current fill:#f96,stroke:#c00,stroke-width:3px")
        lines.append(f"    class {ids[current]} current")
    return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    """A DOT quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot(definition: SagaDefinition, current: str | None) -> str:
    start = "__start__"
    while start in definition.states:
        start = f"_{start}_"
    lines = [
        f"digraph {_q(definition.type)} {{",
        "    rankdir=LR;",
        '    node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica"];',
        '    edge [fontname="Helvetica", fontsize=10];',
        f'    {_q(start)} [shape=point, width=0.15, label=""];',
    ]
    for name, st in definition.states.items():
        attrs = ["peripheries=2"] if st.final else []
        if name == current:
            attrs += ['fillcolor="#ff9966"', 'color="#cc0000"', "penwidth=3"]
        lines.append(f"    {_q(name)}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    for to in _start_states(definition):
        lines.append(f"    {_q(start)} -> {_q(to)};")
    for src, dst, labels in edges(definition):
        lines.append(f"    {_q(src)} -> {_q(dst)} [label={_q(chr(10).join(labels))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
