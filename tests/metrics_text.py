"""A strict reader of the Prometheus text format (0.0.4) for the tests and bench/soak.py.

Strict on purpose: a line a Prometheus server would reject (a sample before its TYPE, a bad name,
an unescaped quote, a non-numeric value) raises instead of being skipped.
"""

from __future__ import annotations

import re

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

Key = tuple[str, tuple[tuple[str, str], ...]]


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    out, pos = [], 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        if match is None:
            raise ValueError(f"bad labels: {text!r}")
        value = match.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        out.append((match.group(1), value))
        pos = match.end()
    return tuple(sorted(out))


def parse(text: str) -> dict[Key, float]:
    """Samples by (name, sorted labels); every family must be declared by HELP and TYPE first."""
    if not text.endswith("\n"):
        raise ValueError("the exposition must end with a newline")
    typed: dict[str, str] = {}
    samples: dict[Key, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind not in _TYPES or name in typed:
                raise ValueError(f"bad TYPE line: {line!r}")
            typed[name] = kind
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"bad sample line: {line!r}")
        name, labels, value = match.groups()
        if name not in typed:
            raise ValueError(f"sample before its TYPE: {line!r}")
        key = (name, _labels(labels or ""))
        if key in samples:
            raise ValueError(f"duplicate sample: {line!r}")
        samples[key] = float(value)
    return samples


def value(samples: dict[Key, float], name: str, **labels: str) -> float:
    """One sample's value (0 when the series is absent, as Prometheus treats a counter never bumped)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Key, float], name: str) -> float:
    """The sum over every label set of one family."""
    return sum(v for (n, _), v in samples.items() if n == name)
