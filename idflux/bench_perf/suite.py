"""The GPU suite's plan, in the order it runs (``gpu_suite.sh`` runs it; ``--list`` prints it).

1. goals: the cases every goal is judged on, one op at a time in the issues' goal order (issue 16:
   region_attention, adapter, sampling step; issue 17: cosine_infonce, face_warp, training step),
   eager and CUDA-graph device time, each case warmed (Triton compiled) once before timing; the
   results JSON and the goal table (``goals.goals.md``) are rewritten after every op;
2. tests: the CUDA tests only (:mod:`idflux.bench_perf.cuda_tests` deselects every test that does
   not need CUDA);
3. sweeps: the wider benchmark sweeps, time-limited per op.

``python -m idflux.bench_perf.suite --list`` prints the phases and every goal with its case;
``--run-id`` prints the commit the suite records (``$IDFLUX_COMMIT``, git, ``.whl/COMMIT`` or the
source hash).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from idflux.bench_perf.cli import GOAL_OPS

# Seconds each phase may take in the first run (the whole suite within 300 s on an H100/H200).
PHASE_BUDGET_S = {"goals": 170, "tests": 60, "sweeps": 60}
TEST_PATHS = ("tests/kernels", "tests/engine", "tests/losses", "tests/train")
SWEEP_OPS = ("region_attention", "cosine_infonce", "face_warp", "adapter")


def goal_plan() -> list[dict]:
    """Every goal of every op, in the order the suite measures them."""
    plan = []
    for op in GOAL_OPS:
        module = importlib.import_module(f"idflux.bench_perf.bench_{op}")
        for g in module.GOALS:
            where = " ".join(f"{k}={v}" for k, v in g.where)
            sign = "<=" if g.metric == "slowdown" else ">="
            plan.append({"phase": "goals", "op": op, "issue": g.issue, "text": g.text, "provider": g.provider,
                         "baseline": g.baseline, "mode": g.mode, "metric": g.metric, "bound": g.bound,
                         "line": f"{op}: #{g.issue} {g.provider} vs {g.baseline} {g.mode} {g.metric} {sign} {g.bound:g}"
                                 f"{' [' + where + ']' if where else ''} ({g.text})"})
    return plan


def commands(out_dir: str = "gpu_results") -> list[tuple[str, str]]:
    """(phase, shell command) in the order the suite runs them."""
    py = "$PY"
    return [
        ("goals", f"timeout {PHASE_BUDGET_S['goals']} {py} -m idflux bench --goals --device cuda --budget 0 "
                  f"--out {out_dir}/goals.json"),
        ("tests", f"timeout {PHASE_BUDGET_S['tests']} {py} -m pytest -q -rfEs -p no:cacheprovider "
                  f"-p idflux.bench_perf.cuda_tests $XDIST {' '.join(TEST_PATHS)}"),
        ("sweeps", f"timeout {PHASE_BUDGET_S['sweeps']} {py} -m idflux bench {' '.join(SWEEP_OPS)} --device cuda "
                   f"--op-budget {PHASE_BUDGET_S['sweeps'] // len(SWEEP_OPS)} --out {out_dir}/bench_cuda.json "
                   f"--plot {out_dir}"),
    ]


def list_lines(out_dir: str = "gpu_results") -> list[str]:
    lines = [f"phase 1: goals (<= {PHASE_BUDGET_S['goals']} s): eager + CUDA-graph device time, goal table after every op"]
    lines += [f"  goal {i + 1}. {g['line']}" for i, g in enumerate(goal_plan())]
    for phase, cmd in commands(out_dir):
        lines.append(f"run {phase}: {cmd}")
    lines.append(f"phase 2: tests (<= {PHASE_BUDGET_S['tests']} s): CUDA tests only, in {' '.join(TEST_PATHS)}")
    lines.append(f"phase 3: sweeps (<= {PHASE_BUDGET_S['sweeps']} s): {' '.join(SWEEP_OPS)}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m idflux.bench_perf.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the phases and goals in the order they run")
    p.add_argument("--run-id", action="store_true", help="print the commit the suite records")
    p.add_argument("--out", default="gpu_results", help="output folder named in the listed commands")
    args = p.parse_args(argv)
    if args.run_id:
        from idflux.bench_perf.harness import git_commit

        print(git_commit())
        return 0
    if args.list:
        print("\n".join(list_lines(args.out)))
        return 0
    p.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
