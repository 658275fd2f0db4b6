#!/usr/bin/env python3
"""Generate the documentation of every option from the settings table (``config.settings_table()``).

    scripts/gen_config.py                 # rewrite conf/anycable.conf (commented sample config)
    scripts/gen_config.py --readme        # rewrite the options table between the markers in README.rst
    scripts/gen_config.py --all           # both
    scripts/gen_config.py --check         # exit 1 if either file is out of date (what the tests check)

The option table in README.rst lives between the lines ``.. BEGIN OPTIONS`` and ``.. END OPTIONS``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from anycable_gevent import config  # noqa: E402

CONF = ROOT / "conf" / "anycable.conf"
README = ROOT / "README.rst"
BEGIN = ".. BEGIN OPTIONS"
END = ".. END OPTIONS"

CONF_HEADER = """\
# anycable-gevent configuration file.
#
# Generated from the settings table by scripts/gen_config.py: every option is listed
# below with its default value, commented out. Copy this file (the systemd unit reads
# /etc/anycable-gevent/anycable.conf), uncomment what you change, and start the server
# with `anycable-gevent --config /path/to/anycable.conf`.
#
# Format: one `key = value` per line (`key: value` works too); `#` starts a comment.
# Booleans are true or false; lists are comma-separated (a,b) or bracketed ([a, b]);
# an empty value means "not set". Option names may use - or _.
#
# Precedence: command-line flags > ANYCABLE_* environment variables > this file > defaults.
# Secrets are better kept out of this file: put ANYCABLE_SECRET (and friends) in the
# systemd EnvironmentFile, readable by root only.
"""


def _aliases(row: dict[str, Any]) -> list[str]:
    """Extra flag spellings declared for an option (not the automatic dashed form)."""
    seen = {row["name"]}
    out = []
    for flag in row["flags"]:
        key = flag.lstrip("-").replace("-", "_")
        if key not in seen:
            seen.add(key)
            out.append("--" + key)
    return out


def _choices(row: dict[str, Any]) -> list[str]:
    return [c for c in (row["choices"] or ()) if c]


def render_conf() -> str:
    out = [CONF_HEADER.rstrip("\n")]
    by_section: dict[str, list[dict[str, Any]]] = {}
    for row in config.settings_table():
        by_section.setdefault(row["section"], []).append(row)
    for section, title in config.SECTIONS.items():
        rows = by_section.get(section)
        if not rows:
            continue
        out += ["", f"# {'=' * 78}", f"# {title}", f"# {'=' * 78}"]
        for row in rows:
            out.append("")
            out.append(f"# {row['help'].rstrip('.')}.")
            notes = [f"env: {', '.join(row['env'])}"]
            aliases = _aliases(row)
            if aliases:
                notes.append(f"also: {', '.join(aliases)}")
            choices = _choices(row)
            if choices:
                notes.append(f"one of: {', '.join(choices)}")
            out.append(f"# ({'; '.join(notes)})")
            value = config.format_default(row["default"])
            out.append(f"# {row['name']} = {value}".rstrip())
    return "\n".join(out) + "\n"


_RST_SPECIAL = re.compile(r"([\\*`|])")
_TRAILING_UNDERSCORE = re.compile(r"(?<=\w)_(?=\W|$)")


def _rst(text: str) -> str:
    return _TRAILING_UNDERSCORE.sub(r"\\_", _RST_SPECIAL.sub(r"\\\1", text))


def render_readme_table() -> str:
    by_section: dict[str, list[dict[str, Any]]] = {}
    for row in config.settings_table():
        by_section.setdefault(row["section"], []).append(row)
    out = [BEGIN, ""]
    for section, title in config.SECTIONS.items():
        rows = by_section.get(section)
        if not rows:
            continue
        out += [f"**{_rst(title)}**", "", ".. list-table::", "   :header-rows: 1", "   :widths: 30 30 15 45", ""]
        out += ["   * - Option", "     - Environment", "     - Default", "     - Description"]
        for row in rows:
            flags = ", ".join(f"``{f}``" for f in ["--" + row["name"], *_aliases(row)])
            env = ", ".join(f"``{e}``" for e in row["env"])
            value = config.format_default(row["default"])
            default = f"``{value}``" if value else "(empty)"
            desc = _rst(row["help"])
            choices = _choices(row)
            if choices:
                desc += " (" + ", ".join(f"``{c}``" for c in choices) + ")"
            out += [f"   * - {flags}", f"     - {env}", f"     - {default}", f"     - {desc}"]
        out.append("")
    out.append(END)
    return "\n".join(out)


def readme_with_table(text: str) -> str:
    start = text.find(BEGIN)
    end = text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: markers {BEGIN!r} and {END!r} not found")
    return text[:start] + render_readme_table() + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="rewrite the options table in README.rst")
    parser.add_argument("--all", action="store_true", help="rewrite conf/anycable.conf and README.rst")
    parser.add_argument("--check", action="store_true", help="only check that both files are current")
    args = parser.parse_args(argv)
    targets = [(CONF, lambda _: render_conf())]
    readme_target = (README, readme_with_table)
    if args.check or args.all:
        targets.append(readme_target)
    elif args.readme:
        targets = [readme_target]
    stale = []
    for path, render in targets:
        current = path.read_text() if path.exists() else ""
        wanted = render(current)
        if current == wanted:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(wanted)
            print(f"wrote {path.relative_to(ROOT)}")
    for path in stale:
        print(f"{path.relative_to(ROOT)} is out of date: run scripts/gen_config.py --all", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
