"""Metrics: counting, the Prometheus text, the log line, and the sum across worker files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from anycable_gevent.metrics import (
    COUNTERS,
    GAUGES,
    Metrics,
    clear_directory,
    parse_tags,
    read_directory,
    render_prometheus,
)


def families(text: str) -> dict[str, tuple[str, dict[str, float], list[dict[str, str]]]]:
    """Parsed with prometheus-client: sample name -> (type, value by name, labels of each sample)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[sample.name] = (fam.type, sample.value, sample.labels)
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_inc_external_and_gauges_in_snapshot() -> None:
    m = Metrics()
    m.inc("client_msg_total")
    m.inc("client_msg_total", 4)
    m.counters["data_rcvd_total"] += 10  # the hot-path spelling
    m.external(lambda: {"server_msg_total": 7, "data_sent_total": 70})
    m.gauge("clients_num", lambda: 3)
    counters, gauges = m.snapshot()
    assert counters["client_msg_total"] == 5
    assert counters["data_rcvd_total"] == 10
    assert counters["server_msg_total"] == 7 and counters["data_sent_total"] == 70
    assert gauges == {**dict.fromkeys(GAUGES, 0.0), "clients_num": 3.0}


def test_broken_gauge_reads_zero() -> None:
    m = Metrics()
    m.gauge("clients_num", lambda: 1 / 0)
    assert m.snapshot()[1]["clients_num"] == 0.0


def test_slow_gauge_is_cached_until_refresh() -> None:
    calls = []

    def expensive() -> int:
        calls.append(1)
        return len(calls)

    m = Metrics()
    m.gauge("goroutines_num", expensive, slow=True)
    assert m.snapshot()[1]["goroutines_num"] == 1
    assert m.snapshot()[1]["goroutines_num"] == 1
    m.refresh()
    assert m.snapshot()[1]["goroutines_num"] == 2
    assert len(calls) == 2


def test_prometheus_text_has_every_anycable_go_metric() -> None:
    m = Metrics()
    for name in GAUGES:
        m.gauge(name, lambda: 2)
    m.inc("publications_total", 3)
    text = m.prometheus()
    parsed = families(text)
    for name in COUNTERS:
        assert parsed["anycable_go_" + name][0] == "counter"
    for name in GAUGES:
        assert parsed["anycable_go_" + name][:2] == ("gauge", 2)
    assert parsed["anycable_go_publications_total"][1] == 3
    # anycable-go's layout: each metric a block of HELP, TYPE and the sample after an empty line
    assert (
        "\n# HELP anycable_go_clients_num The number of active clients\n"
        "# TYPE anycable_go_clients_num gauge\nanycable_go_clients_num 2\n"
    ) in text
    assert "# TYPE anycable_go_publications_total counter\nanycable_go_publications_total 3\n" in text


def test_tags_become_labels_on_every_sample() -> None:
    text = render_prometheus({"client_msg_total": 1}, {"clients_num": 0.5}, parse_tags(["env:prod", "dc:eu:1"]))
    parsed = families(text)
    assert parsed["anycable_go_client_msg_total"][2] == {"env": "prod", "dc": "eu:1"}
    assert parsed["anycable_go_clients_num"][1:] == (0.5, {"env": "prod", "dc": "eu:1"})


def test_label_values_are_escaped_and_names_cleaned() -> None:
    tags = parse_tags(['app-name:say "hi"\\', "1bad:x", ":novalue"])
    assert tags == {"app_name": 'say "hi"\\'}
    parsed = families(render_prometheus({"client_msg_total": 0}, {}, tags))
    assert parsed["anycable_go_client_msg_total"][2] == {"app_name": 'say "hi"\\'}


def test_log_line_has_counter_deltas_and_gauges_sorted() -> None:
    m = Metrics()
    m.gauge("clients_num", lambda: 4)
    m.inc("publications_total", 2)
    first = m.log_line()
    keys = [pair.split("=")[0] for pair in first.split()]
    assert keys == sorted(keys) == sorted([*COUNTERS, *GAUGES])
    assert "publications_total=2" in first.split() and "clients_num=4" in first.split()
    m.inc("publications_total", 3)
    assert m.log_line(["publications_total", "clients_num"]) == "clients_num=4 publications_total=3"
    assert m.log_line(["publications_total"]) == "publications_total=0"


def test_two_workers_writing_one_directory_are_summed(tmp_path: Path) -> None:
    a = Metrics(str(tmp_path), worker="a")
    b = Metrics(str(tmp_path), worker="b")
    a.gauge("clients_num", lambda: 2)
    b.gauge("clients_num", lambda: 5)
    a.inc("publications_total", 1)
    b.inc("publications_total", 10)
    a.refresh()
    b.refresh()
    for m in (a, b):
        counters, gauges = m.collect()
        assert counters["publications_total"] == 11
        assert gauges["clients_num"] == 7
    # a scrape uses the answering worker's live values and the others' last files
    b.inc("publications_total", 100)
    assert b.collect()[0]["publications_total"] == 111
    assert a.collect()[0]["publications_total"] == 11
    b.refresh()
    assert families(a.prometheus())["anycable_go_publications_total"][1] == 111


def test_a_dead_workers_counters_stay_and_its_gauges_go(tmp_path: Path) -> None:
    live = Metrics(str(tmp_path), worker="live")
    live.gauge("clients_num", lambda: 1)
    live.inc("client_msg_total", 2)
    (tmp_path / "worker-gone.json").write_text(
        json.dumps({"pid": dead_pid(), "counters": {"client_msg_total": 40}, "gauges": {"clients_num": 9.0}, "time": 0})
    )
    counters, gauges = live.collect()
    assert counters["client_msg_total"] == 42
    assert gauges["clients_num"] == 1


def test_unreadable_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "worker-torn.json").write_text('{"pid": ')
    (tmp_path / "worker-odd.json").write_text(json.dumps({"pid": os.getpid(), "counters": []}))
    (tmp_path / "worker-ok.json").write_text(
        json.dumps({"pid": os.getpid(), "counters": {"client_msg_total": 3}, "gauges": {"clients_num": 1}})
    )
    (tmp_path / "unrelated.json").write_text(json.dumps({"pid": os.getpid(), "counters": {"client_msg_total": 99}}))
    assert read_directory(str(tmp_path)) == ({"client_msg_total": 3}, {"clients_num": 1.0})


def test_shutdown_writes_the_final_counts(tmp_path: Path) -> None:
    m = Metrics(str(tmp_path), worker="w")
    m.inc("publications_total", 5)
    m.shutdown()
    data = json.loads((tmp_path / "worker-w.json").read_text())
    assert data["pid"] == os.getpid() and data["counters"]["publications_total"] == 5
    assert not list(tmp_path.glob(".*tmp"))


def test_missing_directory_is_created_on_write(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet"
    Metrics(str(target), worker="w").refresh()
    assert (target / "worker-w.json").is_file()


def test_clear_directory_removes_only_snapshot_files(tmp_path: Path) -> None:
    for worker in ("a", "b"):
        Metrics(str(tmp_path), worker=worker).refresh()
    (tmp_path / "keep.txt").write_text("x")
    assert clear_directory(str(tmp_path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert read_directory(str(tmp_path)) == ({}, {})
