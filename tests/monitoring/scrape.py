"""Scraping a node's metrics endpoints over HTTP, as Prometheus does."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.harness.node import Node

DEFAULT_PORTS = {"storage": 9941, "replicator": 9942, "admin": 9943}


def metrics_url(node: Node, service: str) -> str:
    port = node.config.get("metrics", {}).get(f"{service}Port", DEFAULT_PORTS[service])
    return f"http://{node.host}:{port}/metrics"


@dataclass
class Scrape:
    """One scrape: the metric families and their samples."""

    text: str
    content_type: str

    def __post_init__(self) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def find(self, name: str, **labels: str) -> list[Sample]:
        """Samples named ``name`` whose labels include ``labels``."""
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample named ``name`` with these labels (None if absent)."""
        found = self.find(name, **labels)
        assert len(found) <= 1, f"{len(found)} samples of {name} match {labels}"
        return found[0].value if found else None

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.find(name) if label in s.labels}


def scrape(node: Node, service: str) -> Scrape:
    with urllib.request.urlopen(metrics_url(node, service), timeout=10) as reply:
        return Scrape(reply.read().decode(), reply.headers.get("Content-Type", ""))
