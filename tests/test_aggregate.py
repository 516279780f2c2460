"""The aggregator: same samples as stock MultiProcessCollector, liveness, corruption."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from victor_mp_metrics import _compat
from victor_mp_metrics._mpdir import DirectoryReader, compact

from ._dirs import live_owner, ours, read_data_file, stock, write_data_file

_MODES = sorted(_compat.GAUGE_MODES)  # stock modes: info and stateset are ours
_values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda v: round(v, 3))
_labels = st.sampled_from([{}, {"a": "x"}, {"a": "y"}, {"a": "x", "b": "ü z"}])


@st.composite
def _directories(draw):
    """A random directory: writers of every kind and gauge mode, some already archived."""
    writers = draw(st.integers(min_value=1, max_value=6))
    files = []
    clock = 0.0  # distinct timestamps: with ties, "mostrecent" depends on file order
    for w in range(writers):
        ident = f"{10000 + w}-{w:08x}"
        for kind in draw(st.sets(st.sampled_from(
            ["counter", "histogram", "summary", *(f"gauge_{m}" for m in _MODES)]
        ), min_size=1, max_size=5)):
            entries = []
            for labels in draw(st.lists(_labels, min_size=1, max_size=3, unique_by=str)):
                if kind == "counter":
                    entries.append(("c", "c_total", labels, abs(draw(_values)), 0.0))
                elif kind == "summary":
                    entries.append(("s", "s_count", labels, draw(st.integers(0, 50)), 0.0))
                    entries.append(("s", "s_sum", labels, abs(draw(_values)), 0.0))
                elif kind == "histogram":
                    for le in ("0.5", "1.0", "+Inf"):
                        entries.append(("h", "h_bucket", {**labels, "le": le},
                                        draw(st.integers(0, 20)), 0.0))
                    entries.append(("h", "h_sum", labels, abs(draw(_values)), 0.0))
                else:
                    mode = kind.split("_", 1)[1]
                    ts = 0.0
                    if "mostrecent" in mode:
                        clock += draw(st.integers(1, 3))
                        ts = clock
                    entries.append((f"g_{mode}", f"g_{mode}", labels, draw(_values), ts))
            files.append((kind, ident, entries))
    return writers, files


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_directories())
def test_same_samples_as_stock_collector(tmp_path_factory, spec):
    """On any directory of live writers, our samples equal stock MultiProcessCollector's."""
    directory = tmp_path_factory.mktemp("d")
    writers, files = spec
    fds = [live_owner(directory, f"{10000 + w}-{w:08x}") for w in range(writers)]
    try:
        for kind, ident, entries in files:
            write_data_file(directory, kind, ident, entries)
        expected = stock(directory)
        assert expected == ours(directory)
        # A second scrape (all caches warm) still agrees.
        collector = DirectoryReader(str(directory))
        collector.collect()
        from ._dirs import samples

        assert expected == samples(collector.collect())
    finally:
        for fd in fds:
            os.close(fd)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_directories(), survivors=st.integers(0, 6))
def test_compaction_keeps_stock_totals(tmp_path_factory, spec, survivors):
    """Compacting dead writers changes no counter, histogram, summary or sum/min/max gauge."""
    directory = tmp_path_factory.mktemp("d")
    writers, files = spec
    fds = {w: live_owner(directory, f"{10000 + w}-{w:08x}") for w in range(writers)}
    for kind, ident, entries in files:
        write_data_file(directory, kind, ident, entries)
    try:
        before = {k: v for k, v in stock(directory).items() if _kept(k)}
        for w in range(writers):
            if w >= survivors:
                os.close(fds.pop(w))
        compact(str(directory))
        after_stock = {k: v for k, v in stock(directory).items() if _kept(k)}
        after_ours = {k: v for k, v in ours(directory).items() if _kept(k)}
        assert _rounded(before) == _rounded(after_stock)
        assert _rounded(before) == _rounded(after_ours)
    finally:
        for fd in fds.values():
            os.close(fd)


def _kept(key) -> bool:
    """Samples compaction preserves: everything but per-process and live gauges."""
    name = key[0]
    return not (name.startswith("g_live") or name == "g_all")


def _rounded(values: dict) -> dict:
    return {k: round(v, 6) for k, v in values.items()}


def test_dead_writers_live_gauges_vanish_at_once(tmp_path: Path):
    """A live* gauge of a dead writer is not counted, even before any compaction."""
    alive, dead = "1-00000001", "2-00000002"
    fd = live_owner(tmp_path, alive)
    os.close(live_owner(tmp_path, dead))
    for ident in (alive, dead):
        write_data_file(tmp_path, "gauge_livesum", ident, [("conn", "conn", {}, 3.0, 0)])
        write_data_file(tmp_path, "counter", ident, [("req", "req_total", {}, 5.0, 0)])
    try:
        got = ours(tmp_path)
        assert 3.0 == got[("conn", ())]
        assert 10.0 == got[("req_total", ())]
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 7, b"\x40\x00\x00\x00\x00\x00\x00\x00" + b"\x05", os.urandom(64) + b"junk"],
    ids=["empty", "short", "truncated", "garbage"],
)
def test_corrupt_file_is_skipped_counted_and_quarantined(tmp_path: Path, caplog, content):
    """A corrupt file of a dead writer never fails a scrape; it is logged once and moved."""
    write_data_file(tmp_path, "counter", str(2**22 + 1), [("req", "req_total", {}, 4.0, 0)])
    (tmp_path / f"counter_{2**22 + 2}.db").write_bytes(content)
    collector = DirectoryReader(str(tmp_path))
    with caplog.at_level(logging.ERROR, logger="victor_mp_metrics"):
        first, report1 = collector.read()
        second, report2 = collector.read()
    from ._dirs import samples

    assert {("req_total", ()): 4.0} == samples(first) == samples(second)
    assert 1 == report1.corrupt + report2.corrupt
    assert 1 == report1.quarantined
    assert 1 == sum("corrupt" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / f"counter_{2**22 + 2}.db").exists()
    assert 1 == len(os.listdir(tmp_path / "quarantine"))


def test_counts_files_and_bytes_read(tmp_path: Path):
    """Self-metrics report how many files and bytes a scrape read."""
    ident = "7-00000007"
    fd = live_owner(tmp_path, ident)
    try:
        path = write_data_file(tmp_path, "counter", ident, [("req", "req_total", {}, 1.0, 0)])
        collector = DirectoryReader(str(tmp_path))
        _families, report = collector.read()
        assert 1 == report.files
        assert read_data_file(str(path)).__len__() == report.nbytes
    finally:
        os.close(fd)
