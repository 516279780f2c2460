"""The text format printed from merged arrays equals generate_latest of the reader's families."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import generate_latest
from prometheus_client.mmap_dict import mmap_key

from victor_mp_metrics import _compat
from victor_mp_metrics._exposition import FamiliesCollector
from victor_mp_metrics._mpdir import DirectoryReader, add_tombstone, compact
from victor_mp_metrics._mpdir._writer import _WriterFile

from ._dirs import live_owner, write_data_file

_MODES = sorted(_compat.GAUGE_MODES)
_values = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda v: round(v, 3)),
    st.sampled_from([0.0, -0.0, 1e7, 123456789.5, float("inf"), float("-inf"), float("nan")]),
)
_labels = st.sampled_from([{}, {"a": "x"}, {"a": 'q"\\\nz'}, {"a": "x", "b": "ü z"}])


@st.composite
def _directories(draw):
    """Writers of every kind and gauge mode, with values stock never writes (NaN, -0.0)."""
    writers = draw(st.integers(min_value=1, max_value=4))
    files = []
    clock = 0.0
    for w in range(writers):
        ident = f"{20000 + w}-{w:08x}"
        for kind in draw(st.sets(st.sampled_from(
            ["counter", "histogram", "summary", *(f"gauge_{m}" for m in _MODES)]
        ), min_size=1, max_size=5)):
            entries = []
            for labels in draw(st.lists(_labels, min_size=1, max_size=3, unique_by=str)):
                clock += 1.0
                if kind == "counter":
                    entries.append(("c", "c_total", labels, draw(_values), clock))
                elif kind == "summary":
                    entries.append(("s", "s_count", labels, draw(_values), clock))
                    entries.append(("s", "s_sum", labels, draw(_values), clock))
                elif kind == "histogram":
                    for le in draw(st.permutations(["0.5", "1.0", "+Inf", "1e7"])):
                        entries.append(("h", "h_bucket", {**labels, "le": le},
                                        draw(_values), clock))
                    entries.append(("h", "h_sum", labels, draw(_values), clock))
                else:
                    mode = kind.split("_", 1)[1]
                    if mode in ("info", "stateset"):
                        value = draw(st.sampled_from([0.0, 1.0]))
                        extra = ({"__info__": '{"v": "1"}'} if mode == "info"
                                 else {f"g_{mode}": draw(st.sampled_from(["a", "b"]))})
                        entries.append((f"g_{mode}", f"g_{mode}", {**labels, **extra},
                                        value, clock))
                    else:
                        entries.append((f"g_{mode}", f"g_{mode}", labels, draw(_values),
                                        draw(st.sampled_from([0.0, clock]))))
            files.append((kind, ident, entries))
    return writers, files


def _slow(directory: Path) -> bytes:
    return generate_latest(FamiliesCollector(DirectoryReader(str(directory)).read()[0]))


def _fast(reader: DirectoryReader) -> bytes | None:
    """read_text's text; the first time it sees new sources it must give the families."""
    first = reader.read_text(frozenset(), frozenset())
    found = reader.read_text(frozenset(), frozenset())
    assert found.text is not None
    if first.text is None:
        assert found.text.encode() == generate_latest(FamiliesCollector(first.families))
    return found.text.encode("utf-8")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_directories(), survivors=st.integers(0, 4))
def test_fast_text_equals_generate_latest(tmp_path_factory, spec, survivors):
    """Same bytes as generate_latest of read(): cold, warm, after deaths and compaction."""
    directory = tmp_path_factory.mktemp("d")
    writers, files = spec
    fds = {w: live_owner(directory, f"{20000 + w}-{w:08x}") for w in range(writers)}
    try:
        for kind, ident, entries in files:
            write_data_file(directory, kind, ident, entries)
        reader = DirectoryReader(str(directory))
        assert _slow(directory) == _fast(reader)
        assert _slow(directory) == _fast(reader)  # warm plan
        for w in range(writers):
            if w >= survivors:
                os.close(fds.pop(w))
        assert _slow(directory) == _fast(reader)  # dead writers' live gauges gone
        compact(str(directory))
        assert _slow(directory) == _fast(reader)  # archive as the base
    finally:
        for fd in fds.values():
            os.close(fd)


def test_tombstone_on_a_live_file_falls_back_to_the_families(tmp_path: Path) -> None:
    """A removed label set in a writer file: read_text gives read()'s families instead."""
    fd = live_owner(tmp_path, "30000-0000abcd")
    try:
        write_data_file(tmp_path, "counter", "30000-0000abcd",
                        [("c", "c_total", {"a": "x"}, 2.0, 1.0),
                         ("c", "c_total", {"a": "y"}, 3.0, 1.0)])
        add_tombstone(str(tmp_path), "c", {"a": "x"})
        reader = DirectoryReader(str(tmp_path))
        reader.read_text(frozenset(), frozenset())
        found = reader.read_text(frozenset(), frozenset())
        assert found.text is None
        assert _slow(tmp_path) == generate_latest(FamiliesCollector(found.families))
    finally:
        os.close(fd)


def test_wanted_and_excluded_families(tmp_path: Path) -> None:
    """``wanted`` families come back as Metrics; ``excluded`` ones are left out of the text."""
    fd = live_owner(tmp_path, "30000-0000abcd")
    try:
        write_data_file(tmp_path, "counter", "30000-0000abcd",
                        [("hits", "hits_total", {"a": "x"}, 2.0, 1.0),
                         ("other", "other_total", {}, 3.0, 1.0)])
        reader = DirectoryReader(str(tmp_path))
        for _ in range(2):  # the second read has a plan
            found = reader.read_text(frozenset({"hits"}), frozenset({"other"}))
        assert ["hits"] == [m.name for m in found.families]
        assert 2.0 == found.families[0].samples[0].value
        assert found.text is not None and "other" not in found.text
        assert "hits_total{a=\"x\"} 2.0\n" in found.text
    finally:
        os.close(fd)


def test_render_text_and_gzip_match_the_metric_path(tmp_path: Path, monkeypatch) -> None:
    """render(): the fast text answer has the directory's families first, as gather's does."""
    from prometheus_client.parser import text_string_to_metric_families

    from victor_mp_metrics import _exposition, _runtime

    fd = live_owner(tmp_path, "30000-0000abcd")
    try:
        write_data_file(tmp_path, "counter", "30000-0000abcd",
                        [("victor_cache_hits", "victor_cache_hits_total",
                          {"cache_name": "t"}, 3.0, 1.0),
                         ("victor_cache_misses", "victor_cache_misses_total",
                          {"cache_name": "t"}, 1.0, 1.0)])
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        _runtime.reset()
        _exposition.render({})
        status, headers, body = _exposition.render({"Accept-Encoding": "gzip"})
        assert "200 OK" == status
        assert ("Content-Encoding", "gzip") in headers
        text = gzip.decompress(body).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert 0.75 == families["victor_cache_hit_rate"].samples[0].value
        assert text.startswith(_slow(tmp_path).decode())
        # A name[] filter keeps the Metric path and its answer.
        _s, _h, only = _exposition.render({}, {"name[]": ["victor_cache_hit_rate"]})
        assert [b"victor_cache_hit_rate"] == [line.split(b" ")[2] for line in
                                              only.splitlines() if line.startswith(b"# TYPE")]
    finally:
        os.close(fd)
        _runtime.reset()


def _same_after_a_change(reader: DirectoryReader, directory: Path) -> None:
    """The first scrape after files changed (the plan extended, or the families while a
    rebuild waits) and the next one equal generate_latest of read()."""
    found = reader.read_text(frozenset(), frozenset())
    expected = _slow(directory)
    if found.text is not None:
        assert expected == found.text.encode("utf-8")
    assert expected == _fast(reader)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_directories(), first=st.integers(1, 3))
def test_writers_added_to_a_planned_directory_print_the_same_bytes(tmp_path_factory, spec,
                                                                   first):
    """Writers appearing after the plan was built (a new worker): whether the plan is
    extended or rebuilt, every scrape equals generate_latest of read()."""
    directory = tmp_path_factory.mktemp("d")
    writers, files = spec
    fds = [live_owner(directory, f"{20000 + w}-{w:08x}") for w in range(writers)]
    try:
        early = [f for f in files if int(f[1][:5]) - 20000 < first]
        for kind, ident, entries in early:
            write_data_file(directory, kind, ident, entries)
        reader = DirectoryReader(str(directory))
        assert _slow(directory) == _fast(reader)
        for kind, ident, entries in files:
            if (kind, ident, entries) not in early:
                write_data_file(directory, kind, ident, entries)
        _same_after_a_change(reader, directory)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_new_writer_with_known_samples_is_printed_fast_at_once(tmp_path: Path) -> None:
    """A new worker's file whose samples the plan has extends the plan: its first scrape
    takes the fast path; a new label set builds the plan again (slow once, then fast)."""
    fds = [live_owner(tmp_path, f"{30000 + w}-{w:08x}") for w in range(3)]
    try:
        write_data_file(tmp_path, "counter", "30000-00000000",
                        [("c", "c_total", {"a": "x"}, 2.0, 1.0)])
        reader = DirectoryReader(str(tmp_path))
        _fast(reader)
        write_data_file(tmp_path, "counter", "30001-00000001",
                        [("c", "c_total", {"a": "x"}, 3.0, 2.0)])
        found = reader.read_text(frozenset(), frozenset())
        assert found.text is not None and 'c_total{a="x"} 5.0' in found.text
        write_data_file(tmp_path, "counter", "30002-00000002",
                        [("c", "c_total", {"a": "y"}, 4.0, 3.0)])
        assert reader.read_text(frozenset(), frozenset()).text is None
        assert _slow(tmp_path) == _fast(reader)
    finally:
        for fd in fds:
            os.close(fd)


def _append(writer, entries) -> None:
    """Append ``entries`` to a writer file in place, as a live worker's first uses do."""
    for metric, sample, labels, value, stamp in entries:
        pos = writer.position(mmap_key(metric, sample, list(labels), list(labels.values()),
                                       f"help {metric}"))
        writer.doubles[pos // 8] = value
        writer.doubles[pos // 8 + 1] = stamp


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_directories(), first=st.integers(1, 3), cut=st.data())
def test_files_growing_in_place_print_the_same_bytes(tmp_path_factory, spec, first, cut):
    """Writer files that grow in place with samples the plan has seen in other files (a
    worker's first requests, in any file of the listing) and new writers' files: every
    scrape equals generate_latest of read(), line order included."""
    directory = tmp_path_factory.mktemp("d")
    writers, files = spec
    fds = [live_owner(directory, f"{20000 + w}-{w:08x}") for w in range(writers)]
    opened = []
    try:
        late = []
        for kind, ident, entries in files:
            if int(ident[:5]) - 20000 >= first:
                late.append((None, kind, ident, entries))
                continue
            writer = _WriterFile(str(directory / f"{kind}_{ident}.db"))
            opened.append(writer)
            n = cut.draw(st.integers(0, len(entries)))
            _append(writer, entries[:n])
            late.append((writer, kind, ident, entries[n:]))
        reader = DirectoryReader(str(directory))
        assert _slow(directory) == _fast(reader)
        for writer, kind, ident, entries in late:
            if writer is None:
                write_data_file(directory, kind, ident, entries)
            else:
                _append(writer, entries)
        _same_after_a_change(reader, directory)
    finally:
        for writer in opened:
            writer.close()
        for fd in fds:
            os.close(fd)


def test_lines_keep_one_order_whatever_the_files_order(tmp_path: Path) -> None:
    """Families by name, samples by label set, whatever order workers made them in and
    whichever worker joins: the slow and the fast path print the same sorted text."""
    fds = [live_owner(tmp_path, f"{40000 + w}-{w:08x}") for w in range(3)]
    try:
        write_data_file(tmp_path, "counter", "40000-00000000",
                        [("z", "z_total", {"a": "y"}, 1.0, 1.0),
                         ("y", "y_total", {}, 2.0, 1.0),
                         ("z", "z_total", {"a": "x"}, 3.0, 1.0)])
        write_data_file(tmp_path, "histogram", "40000-00000000",
                        [("h", "h_bucket", {"a": "y", "le": "+Inf"}, 1.0, 1.0),
                         ("h", "h_sum", {"a": "y"}, 1.0, 1.0),
                         ("h", "h_bucket", {"a": "x", "le": "+Inf"}, 1.0, 1.0),
                         ("h", "h_sum", {"a": "x"}, 1.0, 1.0)])
        reader = DirectoryReader(str(tmp_path))
        text = _fast(reader)
        assert _slow(tmp_path) == text
        lines = [line for line in text.decode().splitlines() if not line.startswith("#")]
        assert ['h_sum{a="x"} 1.0', 'h_sum{a="y"} 1.0',
                'h_bucket{a="x",le="+Inf"} 1.0', 'h_count{a="x"} 1.0',
                'h_bucket{a="y",le="+Inf"} 1.0', 'h_count{a="y"} 1.0'] == [
            line for line in lines if line.startswith("h_")]
        names = [line.split(" ")[2] for line in text.decode().splitlines()
                 if line.startswith("# TYPE")]
        assert sorted(names) == names
        assert ['z_total{a="x"} 3.0', 'z_total{a="y"} 1.0'] == [
            line for line in lines if line.startswith("z_")]
        # A second worker writes the same samples in the other order: nothing moves.
        write_data_file(tmp_path, "counter", "40001-00000001",
                        [("z", "z_total", {"a": "x"}, 1.0, 2.0),
                         ("z", "z_total", {"a": "y"}, 1.0, 2.0)])
        text = _fast(reader)
        assert _slow(tmp_path) == text
        lines = [line for line in text.decode().splitlines() if line.startswith("z_")]
        assert ['z_total{a="x"} 4.0', 'z_total{a="y"} 2.0'] == lines
    finally:
        for fd in fds:
            os.close(fd)
