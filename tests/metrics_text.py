"""Reading GET /metrics in the tests and bench/soak.py, with prometheus_client's own parser.

`text_string_to_metric_families` is lenient where a Prometheus server would not be (a sample with
no TYPE becomes `unknown`, a repeated sample is kept twice), so `parse` adds those checks: the tests
should fail on an exposition a scrape would choke on.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]


def parse(text: str) -> dict[Key, float]:
    """Samples by (sample name, sorted labels): histograms give `_bucket`, `_count` and `_sum`."""
    if not text.endswith("\n"):
        raise ValueError("the exposition must end with a newline")
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "unknown":
            raise ValueError(f"family without a TYPE: {family.name}")
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key in samples:
                raise ValueError(f"duplicate sample: {key}")
            samples[key] = float(sample.value)
    return samples


def value(samples: dict[Key, float], name: str, **labels: str) -> float:
    """One sample's value (0 when the series is absent, as Prometheus treats a counter never bumped)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Key, float], name: str, **labels: str) -> float:
    """The sum over every label set of one sample name that has `labels` among its own."""
    want = set(labels.items())
    return sum(v for (n, lb), v in samples.items() if n == name and want <= set(lb))
