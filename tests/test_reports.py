"""What the reports say: work split across processes is not "saved", and tables stay aligned
whatever the length of a setting's name."""

from __future__ import annotations

import json

from fastdiff.core.ledger import Ledger
from fastdiff.core.plan import Decision


def _ledger(processes: int, reused: bool = False) -> Ledger:
    ledger = Ledger(processes=processes)
    for step in range(2):  # this process ran 60 of the 100 FLOPs one unsplit process runs per step
        ledger.record_step(0, step, 999.0 - step, 0.1, flops=60, flops_vanilla=100)
    if reused:
        from fastdiff.core.ledger import ModuleEvent

        ledger.modules.append(ModuleEvent(0, 1, "down_blocks.1", "deepcache", Decision.REUSE, 0.0, 0, 40))
    return ledger


def test_one_process_counts_vanilla_minus_run_as_saved():
    report = _ledger(1).report()
    assert report.flops_saved == 80 and report.processes == 1
    assert "120 run of 200 vanilla, 80 saved (40%; ideal speedup 1.67x)" in report.summary()


def test_a_split_across_processes_is_reported_as_split_not_saved():
    report = _ledger(2).report()
    summary = report.summary()
    assert "denoiser FLOPs split across 2 processes: this one ran 120, 60% of the 200 of one vanilla process" in summary
    assert "saved" not in summary
    assert report.flops_saved == 200 - 2 * 120  # the split added work; it saved none
    assert all(s.flops_saved == 100 - 2 * 60 for s in report.steps)
    assert "split across 2 processes" in str(report)


def test_reuse_under_a_split_is_still_reported_as_saved():
    summary = _ledger(2, reused=True).report().summary()
    assert "split across 2 processes" in summary and "reuse saved" in summary


def test_bench_result_says_the_work_was_split():
    from fastdiff.evals.bench import BenchResult, RunStats

    stats = RunStats([1.0], 1.0, None, 200, 100, 0)
    result = BenchResult("tiny-sd", "cpu", "float32", {}, ["patch:mode=pcpp"], stats, stats, 1.5, 1.9, 1.9, 0.0,
                         40.0, "split across 2 processes", processes=2)
    assert "per process: the work is split across 2 processes, not saved" in str(result)
    assert json.loads(result.to_json())["processes"] == 2


def _aligned(lines: list[str], names: int) -> bool:
    """Past the first ``names`` characters (the left-aligned names), every number of a row ends
    where its column's header ends (an empty cell has nothing to check)."""
    def ends(line: str) -> set[int]:
        return {i + 1 for i, c in enumerate(line)
                if i >= names and c != " " and (i + 1 == len(line) or line[i + 1] == " ")}
    return all(ends(line) <= ends(lines[0]) for line in lines[1:])


def test_quality_table_columns_fit_long_setting_names():
    from fastdiff.evals.quality import QualityPoint, QualityReport

    long_name = "dbcache_taylorseer:Fn=1,Bn=0,residual_diff_threshold=0.12,max_warmup_steps=8"
    report = QualityReport("digits-sd3", 10, 0, 1.5, "vanilla at 50 steps", points=[
        QualityPoint("vanilla", [], 50, 0.01, 1.234, 1.5, None, None, 1.0, "vanilla"),
        QualityPoint(long_name, [long_name], 50, 0.005, 0.6, 2.25, 0.75, 35.5, 0.9, "peer"),
    ])
    table = str(report).splitlines()[1:4]
    assert table[0].startswith("setting ") and long_name in table[2]
    assert _aligned(table, len(long_name)), "\n".join(table)


def test_parallel_bench_table_columns_fit_long_setting_names():
    from fastdiff.evals.parallel_bench import ParallelBenchResult, ParallelRun

    long_name = "deepcache:interval=3,branch=1+patch:mode=distrifusion,warmup_steps=4,neighbor_fraction=0.5"
    result = ParallelBenchResult("tiny-sd", {}, 1, [
        ParallelRun("one process", [], 1, [1.0], 1.0),
        ParallelRun(long_name, long_name.split("+"), 2, [0.6], 0.6, 1.67, {"conv": 2**20}, 0.1, 1e-3, 40.0),
    ])
    table = str(result).splitlines()[1:4]
    assert long_name in table[2] and _aligned(table, len(long_name)), "\n".join(table)
