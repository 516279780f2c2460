"""The merged values of a read, shared by the reader and the text planner: families, file
layouts and snapshots. One owner for each of them; both users import them from here."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar, Sample

from ._format import Key, Labels
from ._merge import merge, rule_of
from ._names import DataFile

SampleKey = tuple[str, Labels]


def _by_labels(sk: SampleKey) -> tuple[Labels, str]:
    return sk[1], sk[0]


def bucket_bound(value: float) -> str:
    # prometheus_client.utils.floatToGoString, for the values a bucket bound can take.
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    text = repr(float(value))
    if "e+" in text:
        mantissa, exponent = text.split("e+")
        return f"{mantissa}e+{int(exponent):02d}"
    return text


def shown_type(typ: str, mode: str) -> str:
    """The type a family of files of ``typ`` and gauge ``mode`` is shown as (Info and Enum
    are stored as gauges of mode ``info`` and ``stateset``)."""
    return {"info": "info", "stateset": "stateset"}.get(mode, typ)


class Family:
    """The merged values of one metric family."""

    __slots__ = ("buckets", "exemplars", "help", "mode", "rule", "typ", "values")

    def __init__(self, typ: str, help_text: str, mode: str) -> None:
        self.typ = shown_type(typ, mode)
        self.help = help_text
        self.mode = mode
        self.rule = rule_of(mode)
        self.values: dict[SampleKey, tuple[float, float]] = {}
        # histogram bucket sample key -> (labels without le, bound)
        self.buckets: dict[SampleKey, tuple[Labels, float]] = {}
        self.exemplars: dict[SampleKey, Exemplar] = {}

    def empty(self) -> Family:
        """A family of the same kind without values."""
        new = Family(self.typ, self.help, self.mode)
        new.typ = self.typ
        return new

    def copy(self) -> Family:
        new = Family(self.typ, self.help, self.mode)
        new.typ = self.typ
        new.values = dict(self.values)
        new.buckets = dict(self.buckets)
        new.exemplars = dict(self.exemplars)
        return new

    def sample_key(self, key: Key, ident: str) -> SampleKey:
        """The sample ``key`` of writer ``ident`` adds to (``all`` modes add a pid label)."""
        if self.mode in ("all", "liveall"):
            return (key.sample, (*key.labels, ("pid", ident)))
        return (key.sample, key.labels)

    def add(self, key: Key, value: float, timestamp: float, ident: str) -> SampleKey:
        sk = self.sample_key(key, ident)
        if key.le is not None and self.typ == "histogram":
            self.buckets[sk] = (key.without_le, key.le)
        merge(self.values, sk, value, timestamp, self.rule)
        return sk

    def order(self) -> tuple[list[SampleKey], list[tuple[Labels, list[SampleKey]]]]:
        """The samples in exposition order: the plain ones by label set (then name), then
        each histogram label set's buckets by bound (followed by its ``_count``), label
        sets in sorted order. The order depends on the samples alone, never on the files'
        order, so a scrape's lines stay in place as workers come and go."""
        plain: list[SampleKey] = []
        groups: dict[Labels, list[tuple[float, SampleKey]]] = {}
        buckets = self.buckets
        for sk in self.values:
            bucket = buckets.get(sk)
            if bucket is None:
                plain.append(sk)
            else:
                groups.setdefault(bucket[0], []).append((bucket[1], sk))
        plain.sort(key=_by_labels)
        return plain, [(labels, [sk for _bound, sk in sorted(bounds, key=lambda b: b[0])])
                       for labels, bounds in sorted(groups.items())]

    def metric(self, name: str, created: bool = False) -> Metric:
        """The family as a prometheus_client Metric; ``created`` adds ``_created`` samples
        (the earliest creation in any process) to counters and histograms."""
        metric = Metric(name, self.help, self.typ)
        samples = metric.samples
        if self.typ == "info":
            self._info_samples(samples)
            return metric
        values = self.values
        exemplars = self.exemplars
        plain, groups = self.order()
        samples.extend(Sample(sk[0], dict(sk[1]), values[sk][0], None, exemplars.get(sk))
                       for sk in plain)
        if created and self.typ in ("counter", "histogram"):
            first: dict[Labels, float] = {}
            for sk, (_value, ts) in values.items():
                if ts > 0.0:
                    bucket = self.buckets.get(sk)
                    labels = bucket[0] if bucket is not None else sk[1]
                    if ts < first.get(labels, float("inf")):
                        first[labels] = ts
            samples.extend(Sample(name + "_created", dict(labels), ts)
                           for labels, ts in sorted(first.items()))
        for labels, sks in groups:
            acc = 0.0
            for sk in sks:
                acc += values[sk][0]
                le = dict(labels)
                le["le"] = bucket_bound(self.buckets[sk][1])
                samples.append(Sample(name + "_bucket", le, acc, None, exemplars.get(sk)))
            samples.append(Sample(name + "_count", dict(labels), acc))
        return metric

    def _info_samples(self, samples: list[Sample]) -> None:
        # One info per label set: the value-1 entry with the newest stamp.
        newest: dict[Labels, tuple[float, Sample]] = {}
        for (sample, labels), (value, ts) in self.values.items():
            if value != 1.0:
                continue
            base = tuple(item for item in labels if item[0] != INFO_LABEL)
            try:
                info = json.loads(dict(labels).get(INFO_LABEL, "{}"))
            except ValueError:
                continue
            if not isinstance(info, dict):
                continue
            if ts >= newest.get(base, (-1.0, None))[0]:
                newest[base] = (ts, Sample(sample, {**dict(base), **info}, 1.0))
        samples.extend(newest[base][1] for base in sorted(newest))


INFO_LABEL = "__info__"


class Layout:
    """Parsed keys and value offsets of one writer file, extended as the file grows."""

    __slots__ = ("entries", "inode", "serial", "used")

    _serials = itertools.count()

    def __init__(self, inode: tuple[int, int]) -> None:
        self.inode = inode
        self.used = 8
        self.entries: list[tuple[Key, int]] = []
        self.serial = next(Layout._serials)  # identifies this layout in a text plan


# One writer file read in a snapshot: its name's meaning, its used bytes, its layout.
Source = tuple[DataFile, bytes, Layout]


@dataclass
class Snapshot:
    """The consistent read behind the text format's fast path (see ``_render``): the
    cached archive families (never to be modified) and the writer files, in order."""

    archive_version: tuple[object, ...]
    archive: dict[str, Family]
    sources: list[Source]
