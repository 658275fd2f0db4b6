"""The shipped configuration: conf/anycable.conf and README's option table are generated
from the settings table and current; the server starts with the sample; the systemd unit
matches the server's shutdown and exit codes."""

from __future__ import annotations

import configparser
import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest
from helpers import ROOT, Server, wait_for

from anycable_gevent import cli, config
from anycable_gevent.errors import EXIT_BOOT

CONF = ROOT / "conf" / "anycable.conf"
UNIT = ROOT / "conf" / "anycable-gevent.service"


def gen_config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config", ROOT / "scripts" / "gen_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def uncommented(text: str) -> str:
    """The sample with every ``# key = value`` line made active."""
    return "\n".join(line[2:] if re.match(r"^# [a-z_]+ =", line) else line for line in text.splitlines())


def test_sample_config_is_current() -> None:
    assert CONF.read_text() == gen_config().render_conf(), "run scripts/gen_config.py"


def test_readme_option_table_is_current() -> None:
    readme = (ROOT / "README.rst").read_text()
    assert gen_config().readme_with_table(readme) == readme, "run scripts/gen_config.py --readme"


def test_readme_lists_every_option() -> None:
    readme = (ROOT / "README.rst").read_text()
    for row in config.settings_table():
        assert f"``--{row['name']}``" in readme, row["name"]
        assert f"``{config.env_name(row['name'])}``" in readme, row["name"]


def test_sample_lists_every_option_with_its_default() -> None:
    text = CONF.read_text()
    for row in config.settings_table():
        line = f"# {row['name']} = {config.format_default(row['default'])}".rstrip()
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line


def test_every_sample_line_parses_to_the_default(tmp_path: Path) -> None:
    path = tmp_path / "all.conf"
    path.write_text(uncommented(CONF.read_text()))
    assert config.load(["--config", str(path)], {}) == config.Config()


@pytest.mark.parametrize("variant", ["as shipped", "every option set"])
def test_server_starts_with_the_sample(make_server: type[Server], tmp_path: Path, variant: str) -> None:
    path = CONF
    if variant == "every option set":
        path = tmp_path / "anycable.conf"
        path.write_text(uncommented(CONF.read_text()))
    # the harness adds --host/--port/--http_broadcast_port on the command line, which beat the file
    s = make_server("--config", str(path), "--noauth").start()
    assert s.get("/health")[0] == 200
    assert "broker: memory" in s.output()


# ---------------------------------------------------------------- systemd


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_runs_the_server_with_the_config_file() -> None:
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/anycable-gevent")
    assert argv[1:] == ["--config", "/etc/anycable-gevent/anycable.conf"]
    assert service["EnvironmentFile"].lstrip("-") == "/etc/anycable-gevent/env"
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_stops_gracefully() -> None:
    service = unit()["Service"]
    defaults = config.Config()
    assert service["KillSignal"] == "SIGTERM"
    # systemd must not SIGKILL a server that is still inside its graceful shutdown
    assert int(service["TimeoutStopSec"]) > defaults.shutdown_timeout + defaults.shutdown_delay
    # a configuration error, or workers that cannot boot, are not retried in a loop
    assert service["RestartPreventExitStatus"].split() == [str(cli.EXIT_CONFIG), str(EXIT_BOOT)]
    # systemctl reload: a rolling restart of the workers
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_server_accepts_the_units_command_line(make_server: type[Server]) -> None:
    argv = shlex.split(unit()["Service"]["ExecStart"])[1:]
    argv[argv.index("/etc/anycable-gevent/anycable.conf")] = str(CONF)
    s = make_server(*argv, "--noauth").start()
    assert s.get("/health")[0] == 200


# ---------------------------------------------------------------- the cluster sample

CLUSTER = ROOT / "conf" / "anycable-cluster.conf"


def test_cluster_sample_starts_two_workers_on_the_redis_broker(make_server: type[Server]) -> None:
    from procs import wait_children
    from redis_helpers import REDIS_URL, delete_prefix, unique_prefix

    prefix = unique_prefix()
    try:
        s = make_server("--config", str(CLUSTER), "--noauth", f"--redis_url={REDIS_URL}", f"--redis_prefix={prefix}")
        s.start()
        assert s.proc is not None
        assert len(wait_children(s.proc.pid, 2)) == 2
        # the first worker announces the components once they run (/health may have been
        # answered by the other one already)
        wait_for(lambda: "broker: redis" in s.output(), what="the broker's announcement")
        assert s.get("/metrics")[0] == 200
    finally:
        delete_prefix(REDIS_URL, prefix)


def test_cluster_sample_sets_only_known_options() -> None:
    cfg = config.load(["--config", str(CLUSTER)], {})
    assert (cfg.workers, cfg.broker, cfg.restorable_shutdown) == (2, "redis", True)
