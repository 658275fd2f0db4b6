"""Property tests of the configuration parser: ``config.load(argv, environ)`` with random
option values returns a :class:`~anycable_gevent.config.Config` or raises
:class:`~anycable_gevent.errors.ConfigError`, never another exception (a traceback
instead of the one-line error the CLI promises)."""

from __future__ import annotations

from helpers import fuzz_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anycable_gevent import config
from anycable_gevent.config import Config
from anycable_gevent.errors import ConfigError

FIELDS = {f.name: config._kind(f) for f in config.fields()}
NAMES = sorted(FIELDS)

# argv and the environment cannot hold NUL; undecodable bytes of argv arrive as surrogates
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=20) | st.text(
    st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), min_size=1, max_size=3
)
URLS = st.sampled_from(
    [
        "redis://user:s3cret@127.0.0.1:6379/0",
        "redis://[::1",
        "redis://[bad",
        "redis://h:99999",
        "redis://h:port",
        "rediss://",
        "unix:///tmp/r.sock",
        "http://[x",
        "http://u:p@h:1/_anycable",
        "grpc://u:p@h",
        "http://user:s3cret/x@127.0.0.1",
        "redis://user:s3cret#x@127.0.0.1:1",
        "http://h:-1",
        "://",
    ]
)
VALUES = st.one_of(
    TEXT,
    URLS,
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "none", "", " ", "0", "1", "-1", "1e999", "nan", "inf", "0x10", "1_000"]),
    st.lists(TEXT, max_size=3).map(",".join),
)


@st.composite
def options(draw: st.DrawFn) -> tuple[list[str], dict[str, str]]:
    argv: list[str] = []
    env: dict[str, str] = {}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=6)):
        value = draw(VALUES)
        where = draw(st.sampled_from(["flag=", "flag", "env", "bare"]))
        if where == "flag=":
            argv.append(f"--{name}={value}")
        elif where == "flag":
            argv += [f"--{name}", value]
        elif where == "bare":
            argv.append(f"--{name}")  # a bool takes no value; others miss theirs
        else:
            env[config.env_name(name)] = value
    if draw(st.booleans()):
        env[draw(st.sampled_from(["PORT", "REDIS_URL", "ANYCABLE_JWT_ID_KEY", "ANYCABLE_HTTP_BROADCAST_SECRET"]))] = (
            draw(VALUES)
        )
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--nope", "-x", "--", "--config=/nonexistent/anycable.conf", "stray"])))
    return argv, env


def load(argv: list[str], env: dict[str, str]) -> Config | ConfigError:
    try:
        return config.load(argv, env)
    except ConfigError as exc:
        return exc


@settings(max_examples=fuzz_examples(80), suppress_health_check=[HealthCheck.too_slow])
@given(opts=options())
def test_random_options_give_a_config_or_a_config_error(opts: tuple[list[str], dict[str, str]]) -> None:
    argv, env = opts
    result = load(argv, env)
    if isinstance(result, ConfigError):
        message = str(result)
        assert message and "\n" not in message, message  # the CLI prints it as one line
        # credentials of a URL option are never echoed (other options echo their bad value)
        assert "s3cret" not in message or not message.startswith(("--redis_url", "--rpc_host")), message
        return
    # a Config that loads also gives its derived values without error
    assert isinstance(result, Config)
    assert result.history_policy.max_ttl > 0
    assert 0 < result.broadcast_port <= 65535
    assert isinstance(config.warnings(result), list)


@settings(max_examples=fuzz_examples(40))
@given(name=st.sampled_from(["redis_url", "rpc_host"]), url=URLS | TEXT.map(lambda t: f"redis://user:s3cret@{t}"))
def test_bad_urls_are_config_errors_without_their_credentials(name: str, url: str) -> None:
    result = load([f"--{name}={url}"], {})
    if isinstance(result, ConfigError):
        assert "s3cret" not in str(result), str(result)


@settings(max_examples=fuzz_examples(100))
@given(
    scheme=st.sampled_from(["redis", "rediss", "http", "https", "grpc"]),
    user=st.text("abcdefghijklmnopqrstuvwxyz0123456789", max_size=6),
    password=st.text(st.characters(blacklist_characters="@", blacklist_categories=["Cs"]), min_size=1, max_size=12),
    host=st.sampled_from(["127.0.0.1", "[::1]", "redis.local", "[bad", ""]),
    rest=st.sampled_from(["", ":6379", ":6379/0", "/_anycable?x=1", ":99999"]),
)
def test_safe_url_never_shows_the_password(scheme: str, user: str, password: str, host: str, rest: str) -> None:
    secret = "PW#" + password
    shown = config.safe_url(f"{scheme}://{user}:{secret}@{host}{rest}")
    assert secret not in shown and "PW#" not in shown, shown
