"""The Prometheus text format (0.0.4) straight from the files, for the steady-state scrape.

A plan is built once per set of sources (the archive generation and every writer file's
layout, in snapshot order): it runs the reader's own merge on the keys alone to learn
each family, its samples and their order, and gives every sample of a summing family
(counters, histograms, summaries, ``sum``/``all`` gauges and their ``live`` kinds) a
slot in one flat array. Each line's text up to its value is printed once, by
prometheus_client's ``generate_latest`` itself, so names, escaping and order are its.
When writer files appear or grow with samples the plan already has (a new worker, a
worker's first requests), the plan is extended by their sources alone; a new sample, a
new family or a new archive generation builds it again.

A scrape then unpacks each file's values with one precompiled ``struct.Struct``, adds
them into the array in the files' order (the same additions as ``merge``, so the same
floats), and joins the prefixes with the formatted values. Families merged by another
rule (max, min, most recent, Info, Enum), whose samples depend on stamps, go through the
reader's ``Family`` and ``generate_latest`` on every scrape; they are small.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from operator import add, itemgetter

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from ._families import Family, SampleKey, Snapshot, shown_type
from ._format import TWO_DOUBLES, Key
from ._merge import SUM
from ._names import DataFile
from ._tombstones import Tombstones

FamilyOf = Callable[[dict[str, Family], Key, DataFile], Family]

# Below this, floatToGoString(v) is repr(v) for every finite v (it rewrites only +-Inf,
# NaN and positive values of 7 or more integer digits).
_REPR_BELOW = 1e6


class _One:
    """A collector of one family, for ``generate_latest``."""

    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        return [self._metric]


def _text(metric: Metric) -> str:
    return generate_latest(_One(metric)).decode("utf-8")


def _getter(slots: Sequence[int]) -> Callable[[list[float]], Sequence[float]]:
    if len(slots) == 1:
        only = slots[0]
        return lambda acc: (acc[only],)
    return itemgetter(*slots)


def _formatted(values: Sequence[float]) -> Iterable[str]:
    total = sum(values)
    if total - total == 0.0 and max(values) < _REPR_BELOW:  # finite, no NaN
        return map(repr, values)
    return map(floatToGoString, values)


class _Fast:
    """A summing family: its header, line prefixes, the slots of its lines in order and
    its histogram groups (start of the buckets in the lines, number of buckets)."""

    __slots__ = ("get", "groups", "head", "prefixes", "slots", "template")

    def __init__(self, template: Family, head: str, prefixes: list[str], slots: list[int],
                 groups: list[tuple[int, int]], sks: dict[SampleKey, int]) -> None:
        self.template = (template, sks)
        self.head = head
        self.prefixes = prefixes
        self.slots = slots
        self.get = _getter(slots) if slots else None
        self.groups = groups

    def text(self, acc: list[float]) -> str:
        if self.get is None:
            return self.head
        values = list(self.get(acc))
        for start, n in self.groups:
            cumulative = list(accumulate(values[start:start + n], initial=0.0))
            cumulative[0] = cumulative[-1]  # the _count line follows the buckets
            values[start:start + n + 1] = cumulative[1:] + cumulative[:1]
        return self.head + "\n".join(map(add, self.prefixes, _formatted(values))) + "\n"

    def metric(self, name: str, acc: list[float]) -> Metric:
        template, sks = self.template
        family = template.empty()
        family.buckets = template.buckets
        family.values = {sk: (acc[slot], 0.0) for sk, slot in sks.items()}
        return family.metric(name)


class _Source:
    """How one writer file's values reach the array."""

    __slots__ = ("dynamic", "gather", "slots", "start", "unpack")

    def __init__(self, positions: list[int], slots: list[int],
                 dynamic: list[tuple[Key, int]]) -> None:
        fmt = ["<"]
        end = 0
        for pos in positions:
            fmt.append(f"{pos - end}xd" if pos > end else "d")
            end = pos + 8
        self.unpack = struct.Struct("".join(fmt)).unpack_from if positions else None
        self.slots = slots
        self.dynamic = dynamic
        self.start = -1  # slots are one run in order from here
        self.gather: Callable[[Sequence[float]], Sequence[float]] | None = None
        n = len(slots)
        if n > 1:
            first = min(slots)
            if slots == list(range(first, first + n)):
                self.start = first
            else:
                order = sorted(range(n), key=slots.__getitem__)
                if [slots[i] for i in order] == list(range(first, first + n)):
                    self.start = first
                    self.gather = itemgetter(*order)

    def add_into(self, acc: list[float], data: bytes) -> None:
        if self.unpack is None:
            return
        values: Sequence[float] = self.unpack(data)
        start = self.start
        if start < 0:
            for slot, value in zip(self.slots, values, strict=True):
                acc[slot] += value
            return
        if self.gather is not None:
            values = self.gather(values)
        end = start + len(values)
        acc[start:end] = map(add, acc[start:end], values)


class _Plan:
    __slots__ = ("base", "by_layout", "items", "kinds", "metrics", "slot_of", "sources",
                 "statics")

    def __init__(self) -> None:
        self.base: list[float] = []
        self.kinds: dict[str, Family] = {}  # every family, without values
        self.slot_of: dict[tuple[str, SampleKey], int] = {}
        # layout serial -> (entries when its source was made, the source)
        self.by_layout: dict[int, tuple[int, _Source]] = {}
        # (family name, Metric name, fast family or None for a dynamic one)
        self.items: list[tuple[str, str, _Fast | None]] = []
        self.sources: list[_Source] = []
        self.statics: dict[str, Family] = {}  # dynamic families: archive part or empty
        self.metrics: set[str] = set()  # the metrics of the writer files


class TextPlanner:
    """The cached plan of one reader (see the module docstring)."""

    def __init__(self, family_of: FamilyOf) -> None:
        self._family_of = family_of
        self._signature: tuple[object, ...] = ()
        self._pending: tuple[object, ...] | None = None
        self._plan: _Plan | None = None

    def render(
        self, snapshot: Snapshot, wanted: frozenset[str], excluded: frozenset[str],
        tombstones: Tombstones,
    ) -> tuple[str, list[Metric]] | None:
        """The text of ``snapshot`` without the ``excluded`` families, and the ``wanted``
        families as Metrics. None (the caller merges entry by entry then) when tombstones
        touch a writer file's metric, or when the sources changed since the last scrape:
        a plan is built only for sources seen twice in a row, so a scrape of a directory
        still growing costs no more than the merge it replaces."""
        sources = snapshot.sources
        signature = (snapshot.archive_version, tombstones.version,
                     *((info.name, layout.serial, len(layout.entries))
                       for info, _data, layout in sources))
        plan = self._plan
        if plan is None or signature != self._signature:
            if plan is not None and signature[:2] == self._signature[:2] and \
                    self._extend(plan, snapshot):
                self._signature = signature
            elif signature != self._pending:
                self._pending = signature
                return None
            else:
                plan = self._plan = self._build(snapshot)
                self._signature = signature
        if tombstones.by_metric and not plan.metrics.isdisjoint(tombstones.by_metric):
            return None
        acc = plan.base.copy()
        dynamic = {name: fam.copy() for name, fam in plan.statics.items()}
        for (info, data, _layout), source in zip(sources, plan.sources, strict=True):
            source.add_into(acc, data)
            for key, pos in source.dynamic:
                value, timestamp = TWO_DOUBLES.unpack_from(data, pos)
                dynamic[key.metric].add(key, value, timestamp, info.ident)
        parts: list[str] = []
        found: list[Metric] = []
        for name, shown, fast in plan.items:
            if fast is None:
                metric = dynamic[name].metric(name)
                if metric.name not in excluded:
                    parts.append(_text(metric))
                if metric.name in wanted:
                    found.append(metric)
                continue
            if shown not in excluded:
                parts.append(fast.text(acc))
            if shown in wanted:
                found.append(fast.metric(name, acc))
        return "".join(parts), found

    def _build(self, snapshot: Snapshot) -> _Plan:
        plan = _Plan()
        # The reader's own merge on the keys alone: families, their kinds and samples.
        families = {name: fam.copy() for name, fam in snapshot.archive.items()}
        entry_keys: list[list[tuple[Key, int, SampleKey | None]]] = []
        for info, _data, layout in snapshot.sources:
            keys: list[tuple[Key, int, SampleKey | None]] = []
            for key, pos in layout.entries:
                family = self._family_of(families, key, info)
                sk = family.add(key, 0.0, 0.0, info.ident) if family.rule == SUM else None
                keys.append((key, pos, sk))
                plan.metrics.add(key.metric)
            entry_keys.append(keys)
        slot_of: dict[tuple[str, SampleKey], int] = {}
        for name, family in sorted(families.items()):
            if family.rule != SUM or family.typ in ("info", "stateset"):
                archived = snapshot.archive.get(name)
                plan.statics[name] = archived.copy() if archived else family.empty()
                plan.items.append((name, name, None))
                continue
            archived = snapshot.archive.get(name)
            fast = self._fast(name, family, archived, plan, slot_of)
            if fast is None:  # not one line per sample: print it the slow way
                plan.statics[name] = archived.copy() if archived else family.empty()
                plan.items.append((name, name, None))
            else:
                plan.items.append(fast)
        plan.kinds = {name: family.empty() for name, family in families.items()}
        plan.slot_of = slot_of
        for keys, (_info, _data, layout) in zip(entry_keys, snapshot.sources, strict=True):
            positions: list[int] = []
            slots: list[int] = []
            dynamic: list[tuple[Key, int]] = []
            for key, pos, sk in keys:
                slot = None if sk is None else slot_of.get((key.metric, sk))
                if slot is None:
                    dynamic.append((key, pos))
                else:
                    positions.append(pos)
                    slots.append(slot)
            source = _Source(positions, slots, dynamic)
            plan.sources.append(source)
            plan.by_layout[layout.serial] = (len(layout.entries), source)
        return plan

    @staticmethod
    def _extend(plan: _Plan, snapshot: Snapshot) -> bool:
        """Point ``plan`` at ``snapshot``'s sources when no source is gone (a gone one may
        have been the only one with a sample) and every entry of a new or grown writer
        file is a sample the plan has, of a family of the same kind (what a rebuild would
        find); False, leaving the plan as it was, otherwise."""
        if not plan.by_layout.keys() <= {layout.serial for _i, _d, layout in snapshot.sources}:
            return False
        by_layout: dict[int, tuple[int, _Source]] = {}
        metrics: set[str] = set()
        for info, _data, layout in snapshot.sources:
            known = plan.by_layout.get(layout.serial)
            if known is not None and known[0] == len(layout.entries):
                by_layout[layout.serial] = known
                continue
            typ = shown_type(info.typ, info.mode)
            positions: list[int] = []
            slots: list[int] = []
            dynamic: list[tuple[Key, int]] = []
            for key, pos in layout.entries:
                family = plan.kinds.get(key.metric)
                if family is None or family.mode != info.mode or family.typ != typ:
                    return False
                metrics.add(key.metric)
                if key.metric in plan.statics:  # printed from its Family on every scrape
                    dynamic.append((key, pos))
                    continue
                slot = plan.slot_of.get((key.metric, family.sample_key(key, info.ident)))
                if slot is None:  # a new sample: it needs a line of its own
                    return False
                positions.append(pos)
                slots.append(slot)
            by_layout[layout.serial] = (len(layout.entries), _Source(positions, slots, dynamic))
        plan.by_layout = by_layout
        plan.sources = [by_layout[layout.serial][1] for _info, _data, layout in snapshot.sources]
        plan.metrics |= metrics
        return True

    @staticmethod
    def _fast(
        name: str, family: Family, archived: Family | None, plan: _Plan,
        slot_of: dict[tuple[str, SampleKey], int],
    ) -> tuple[str, str, _Fast] | None:
        template = family.empty()
        template.buckets = family.buckets
        template.values = dict.fromkeys(family.values, (0.0, 0.0))
        metric = template.metric(name)
        lines = _text(metric).split("\n")
        if len(lines) != len(metric.samples) + 3 or not all(
                line.endswith(" 0.0") for line in lines[2:-1]):
            return None
        start = len(plan.base)
        sks = {sk: start + i for i, sk in enumerate(family.values)}
        for sk in family.values:
            kept = archived.values.get(sk) if archived is not None else None
            # -0.0 is the identity of +: the first addition gives the first value exactly.
            plan.base.append(kept[0] if kept is not None else -0.0)
            slot_of[(name, sk)] = sks[sk]
        plain, groups = family.order()
        slots = [sks[sk] for sk in plain]
        spans: list[tuple[int, int]] = []
        for _labels, bucket_sks in groups:
            spans.append((len(slots), len(bucket_sks)))
            slots.extend(sks[sk] for sk in bucket_sks)
            slots.append(slots[-1])  # the _count line, filled from the buckets
        prefixes = [line[:-3] for line in lines[2:-1]]
        head = lines[0] + "\n" + lines[1] + "\n"
        return name, metric.name, _Fast(template, head, prefixes, slots, spans, sks)
