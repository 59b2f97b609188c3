#!/usr/bin/env python
"""The tested dependency set (constraints/py<major>.<minor>.txt) against this environment.

  python .ci/constraints.py diff  [FILE]   print the packages whose installed version differs from FILE
  python .ci/constraints.py write [FILE]   write FILE from this environment (every installed distribution but
                                           the project itself, local build labels such as +cpu dropped)

FILE defaults to constraints/py<this Python>.txt. ``make test-latest`` runs ``diff`` in a fresh environment
with the newest releases; ``make constraints`` then ``write``s the set that passed.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scgpt_protocol.core.versions import canonical_name, read_constraints  # noqa: E402

PROJECT = "scgpt-protocol"
#: the installers themselves: a pin on setuptools would also bind the build of packages made from source
INSTALLERS = ("pip", "setuptools", "wheel")


def installed() -> dict[str, str]:
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical_name(name) not in (PROJECT, *INSTALLERS):
            out[canonical_name(name)] = dist.version.split("+", 1)[0]
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("diff", "write"):
        print(__doc__)
        return 2
    tag = ".".join(platform.python_version_tuple()[:2])
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "constraints" / f"py{tag}.txt"
    have = installed()
    if argv[0] == "write":
        lines = [f"# The tested dependency set for Python {tag}: every package of an environment that passed the",
                 f"# real-size smoke and the graph tests ({_dt.date.today().isoformat()}); CI runs every test on it.",
                 "# Written by make constraints; used by make install, .ci/run and environment.yml (pip install -c).",
                 *(f"{name}=={version}" for name, version in sorted(have.items()))]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {path}: {len(have)} packages")
        return 0
    tested = read_constraints(path) if path.is_file() else {}
    if not tested:
        print(f"no tested set at {path}: every installed version is new to it")
    changed = {n: (tested.get(n), v) for n, v in have.items() if tested.get(n) != v}
    gone = sorted(n for n in tested if n not in have)
    print(f"{len(changed)} of {len(have)} installed packages differ from {path.name}:")
    for name, (old, new) in sorted(changed.items()):
        print(f"  {name:28s} {old or '(new)':>14s} -> {new}")
    for name in gone:
        print(f"  {name:28s} {tested[name]:>14s} -> (not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
