"""Mutation pass over megalite's core modules with cosmic-ray (outside CI; docs/testing.md).

For each module below, cosmic-ray makes every mutant (one operator changed: ``+`` -> ``-``,
``<`` -> ``<=``, ``True`` -> ``False``, a number changed, a ``break`` -> ``continue``, ...);
this script runs a random sample of ``--per-module`` of them (seeded, so a rerun draws the
same ones) against a FAST test subset that exercises that module, and counts each mutant
killed (the subset failed or timed out) or survived. It works on a copy of the working tree
(``--work``, default /tmp/megalite-mutation), never on your files: cosmic-ray edits the
module in place while a mutant is tested.

    pip install -e '.[mutation]'                  # cosmic-ray
    make mutation                                 # every module, 8 mutants each: ~45-60 min
    .venv/bin/python scripts/mutation.py --module step --per-module 5
    .venv/bin/python scripts/mutation.py --survivors-of /tmp/megalite-mutation/results.json

``--survivors-of`` retests only the mutants that survived an earlier pass (the same sample),
e.g. after strengthening the tests. Results: ``WORK/results.json`` (counts per module and
every survivor's diff) and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = "python -m pytest -x -q -p no:cacheprovider"
CR = str(Path(sys.executable).parent / "cosmic-ray")

LAYERS = ("tests/parallel/test_layers.py "
          "-k 'dense_at_tp or single_process or bad_sizes or padding_rows'")
# module key: (file, the fast tests that exercise it)
MODULES = {
    "comm": ("megalite/parallel/comm.py", LAYERS),
    "cross_entropy": ("megalite/parallel/cross_entropy.py", LAYERS),
    "layers": ("megalite/parallel/layers.py", LAYERS),
    "grad_buffer": ("megalite/parallel/grad_buffer.py",
                    "tests/parallel/test_grad_buffer.py "
                    "tests/training/test_distributed_optimizer.py"),
    # the executor's p2p paths need pipeline ranks: test_3d's 2-process world (1, 2, 1)
    "executor": ("megalite/pipeline/executor.py",
                 "tests/pipeline/test_3d.py -k 'executor_rejects or layouts0' "
                 "tests/pipeline/test_backward.py"),
    "step": ("megalite/training/step.py",
             "tests/training/test_optim_precision.py tests/training/test_mixed_precision.py "
             "tests/training/test_distributed_optimizer.py tests/pipeline/test_schedules.py"
             "::test_a_gpt_placement_is_checked_with_the_fix_named"),
    "checkpoint": ("megalite/training/checkpoint.py",
                   "tests/training/test_checkpoint.py -k 'not distributed_optimizer'"),
    "precision": ("megalite/training/precision.py",
                  "tests/training/test_optim_precision.py tests/training/test_mixed_precision.py"),
    "linear_cross_entropy": ("kernels/linear_cross_entropy.py",
                             "tests/kernels/test_kernel_linear_cross_entropy.py"),
}


def copy_tree(work: Path, ref: str | None) -> None:
    """The working tree's files (tracked and untracked, not ignored), or the commit ``ref``'s,
    into ``work``; the copy imports itself through PYTHONPATH, so ``megalite.kernels`` is
    linked in."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if ref is not None:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    else:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True, text=True).stdout.split()
        for name in files:
            src, dst = ROOT / name, work / name
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    (work / "megalite" / "kernels").symlink_to("../kernels")


def env_for(work: Path) -> dict:
    # No .pyc files: a mutant of the same size written within the same second as the last
    # one would otherwise be skipped in favour of the stale bytecode.
    return {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def mutant_key(item) -> str:
    m = item.mutations[0]
    return f"{m.module_path}:{m.operator_name}:{m.occurrence}"


def run_module(key: str, work: Path, per_module: int, seed: int, only: set | None) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    path, tests = MODULES[key]
    # An older --ref may lack a test file the list names: run the ones it has.
    tests = " ".join(t for t in tests.split(" ")
                     if not t.startswith("tests/") or (work / t.split("::")[0]).exists())
    print(f"== {key}: {path} with {tests}", flush=True)
    env = env_for(work)
    t0 = time.monotonic()
    baseline = subprocess.run(f"timeout 600 {PYTEST} {tests}", shell=True, cwd=work, env=env,
                              capture_output=True, text=True)
    base_s = time.monotonic() - t0
    if baseline.returncode != 0:
        raise SystemExit(f"{key}: the unmutated tests fail, fix them first:\n"
                         f"{baseline.stdout[-2000:]}")
    config, session = work / f"mutation-{key}.toml", work / f"mutation-{key}.sqlite"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{path}"\n'
        f"timeout = {max(60.0, 4 * base_s):.0f}\n"
        "excluded-modules = []\n"
        f'test-command = "{PYTEST} {tests}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n')
    session.unlink(missing_ok=True)
    subprocess.run([CR, "init", str(config), str(session)],
                   cwd=work, env=env, check=True)
    with use_db(str(session), WorkDB.Mode.open) as db:
        items = sorted(db.pending_work_items, key=mutant_key)
        total = len(items)
        chosen = [i for i in items if mutant_key(i) in only] if only is not None else \
            random.Random(seed).sample(items, min(per_module, total))
        keep = {i.job_id for i in chosen}
        db.set_multiple_results([i.job_id for i in items if i.job_id not in keep],
                                WorkResult(worker_outcome=WorkerOutcome.SKIPPED,
                                           output="not sampled"))
    subprocess.run([CR, "exec", str(config), str(session)],
                   cwd=work, env=env, check=True)
    killed, survivors, other = 0, [], 0
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome == TestOutcome.KILLED:
                killed += 1
            elif result.test_outcome == TestOutcome.SURVIVED:
                survivors.append({"mutant": mutant_key(item), "diff": result.diff})
            else:
                other += 1
    return {"module": path, "tests": tests, "mutants": total, "sampled": len(chosen),
            "killed": killed, "survived": len(survivors), "incompetent": other,
            "baseline_s": round(base_s, 1), "seconds": round(time.monotonic() - t0),
            "survivors": survivors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--module", action="append", choices=sorted(MODULES),
                   help="only these modules (repeatable; default: all)")
    p.add_argument("--per-module", type=int, default=8, help="mutants sampled per module")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/megalite-mutation")
    p.add_argument("--ref", default=None,
                   help="test this commit's code and tests (default: the working tree)")
    p.add_argument("--survivors-of", default=None, metavar="RESULTS_JSON",
                   help="retest only the mutants that survived in this earlier results.json")
    args = p.parse_args(argv)
    previous = json.loads(Path(args.survivors_of).read_text()) if args.survivors_of else None
    work = Path(args.work)
    copy_tree(work, args.ref)
    results = []
    for key in args.module or list(MODULES):
        only = None
        if previous is not None:
            before = next((r for r in previous if r["module"] == MODULES[key][0]), None)
            if before is None:
                continue
            only = {s["mutant"] for s in before["survivors"]}
        results.append(run_module(key, work, args.per_module, args.seed, only))
        (work / "results.json").write_text(json.dumps(results, indent=1))
        r = results[-1]
        print(f"   {r['killed']} killed, {r['survived']} survived, {r['incompetent']} other "
              f"of {r['sampled']} sampled ({r['mutants']} mutants), {r['seconds']} s", flush=True)
    print("\n| module | mutants | sampled | killed | survived | other |\n|---|--:|--:|--:|--:|--:|")
    for r in results:
        print(f"| {r['module']} | {r['mutants']} | {r['sampled']} | {r['killed']} | "
              f"{r['survived']} | {r['incompetent']} |")
    print(f"\nsurvivors' diffs: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
