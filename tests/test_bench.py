"""bench/ablation.py's statistics and outputs, on made-up per-seed results (its runs take an hour: not here)."""
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import ablation  # noqa: E402


def test_interval_is_students_t_95_percent_half_width():
    values = [0.80, 0.83, 0.79, 0.85, 0.81]
    mean, half = ablation.interval(values)
    assert mean == pytest.approx(statistics.mean(values))
    # t(0.975, df=4) = 2.7764 (tables); half-width = t * s / sqrt(n)
    assert half == pytest.approx(2.7764 * statistics.stdev(values) / math.sqrt(5), rel=1e-3)  # 3 decimals


def test_t_quantiles_are_students():
    stats = pytest.importorskip("scipy.stats")
    for df, t in ablation.T95.items():
        assert t == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_interval_of_one_seed_has_no_width():
    mean, half = ablation.interval([0.5])
    assert mean == 0.5 and math.isnan(half)


def _row(em, seed):
    row = {k: em for _, k in ablation.COLUMNS}
    row |= {"curve_em": [0.365, em - 0.05, em], "curve_searches": [0.87, 1.3, 1.4], "pairs": 40.0 + seed}
    return row


def test_table_pairs_each_arm_with_grpo_only_seed_by_seed(tmp_path):
    results = {"grpo_only": [_row(0.80, 0), _row(0.90, 1)], "grpo_opsd": [_row(0.82, 0), _row(0.93, 1)]}
    text = ablation.table(results)
    lines = text.splitlines()
    assert lines[0].startswith("| arm | seeds | EM |") and len(lines) == 5
    paired = next(line for line in lines if line.startswith("| grpo_opsd − grpo_only (paired)"))
    # differences 0.02 and 0.03: mean 0.025, half-width t(df=1) * stdev / sqrt(2)
    half = 12.706 * statistics.stdev([0.02, 0.03]) / math.sqrt(2)
    assert paired.split("|")[3].strip() == f"{0.025:.3f} ± {half:.3f}"
    grpo_only = next(line for line in lines if line.startswith("| grpo_only |")).split("|")
    del results["grpo_only"][0]["pairs"]  # an arm without OPSD has no pairs: a dash, not a number
    assert next(line for line in ablation.table(results).splitlines()
                if line.startswith("| grpo_only |")).split("|")[-2].strip() == "—" != grpo_only[-2].strip()
    ablation.plot(results, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
