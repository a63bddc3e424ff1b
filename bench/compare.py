"""One benchmark script run against two revisions of the repository, each in its own process, in one call.

    git worktree add ../prev REV
    python -m bench.compare --baseline ../prev --out results/prev.json -- bench.bench_dit --cases 1p,2p --compile

`--baseline` is another checkout of the repository (a worktree, or `git archive REV | tar -x -C DIR` where there is
no .git). The baseline runs first, then the current tree, with the same arguments; each writes its own JSON (`--out`
is appended), and both land in one file. Two 14B models do not fit one GPU together, hence one process each.
`--same-script` copies today's `bench/` over the baseline's first, to time an older `wan/` with today's protocol (the
script must then use only interfaces both revisions have, e.g. the predictor's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, module: str, args: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", module, *args, "--out", str(out)]
    print(f"== {tree}: {' '.join(command[1:])}", flush=True)
    completed = subprocess.run(command, cwd=tree)
    result = json.loads(out.read_text()) if out.is_file() else {}
    return dict(returncode=completed.returncode, result=result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="root of the other checkout")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--same-script", action="store_true", help="run today's bench/ in the baseline tree")
    parser.add_argument("module", help="e.g. bench.bench_dit")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments after --")
    args = parser.parse_args()
    script_args = [a for a in args.args if a != "--"]
    if args.same_script:
        shutil.copytree(REPO_ROOT / "bench", args.baseline / "bench", dirs_exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, tree in (("baseline", args.baseline.resolve()), ("current", REPO_ROOT)):
            runs[label] = run(tree, args.module, script_args, Path(scratch) / f"{label}.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=1))
    print(f"wrote {args.out}; return codes: " + ", ".join(f"{k} {v['returncode']}" for k, v in runs.items()))
    raise SystemExit(max(v["returncode"] for v in runs.values()))


if __name__ == "__main__":
    main()
