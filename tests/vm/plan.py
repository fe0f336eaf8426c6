"""Turns `cargo test --no-run --message-format=json` on stdin into the VM's
plan: one `suite <name> <dir> <executable> <args...>` line per entry of
tests/vm/suites whose test target cargo built."""
import json
import os
import shlex
import sys
from pathlib import Path

work = Path(sys.argv[1])
exes = {}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        pkg_dir = str(Path(m["manifest_path"]).parent.relative_to(work))
        exes[(pkg_dir, m["target"]["name"])] = m["executable"]

full = os.environ.get("BERTH_VM_FULL") == "1"
for raw in (work / "tests/vm/suites").read_text().splitlines():
    if not raw.strip() or raw.lstrip().startswith("#"):
        continue
    if raw.strip() == "full:":
        if not full:
            break
        continue
    name, pkg, target, *args = raw.split()
    exe = exes.get((pkg, target))
    if exe is None:
        sys.exit(f"plan: no test binary for {pkg}/{target} in cargo's output")
    print(" ".join(["suite", name, shlex.quote(str(work / pkg)), shlex.quote(exe), *map(shlex.quote, args)]))
