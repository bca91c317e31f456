"""The bootstrap callback: off by default, intervals from the replicates, table4.csv gains them, bad settings refused.

The replicates themselves are tested against an independent recomputation in tests/stats; here the callback's
wiring is: the run's seed, bins and permutations reach the bootstrap, the interval is the percentile interval at
``analysis.bootstrap_level`` (numpy's percentile of the replicates, computed here), and the thresholds callback's
row of Table 4 keeps its values.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from featstudy.analysis.bootstrap import BootstrapCallback, check_bootstrap
from featstudy.analysis.thresholds import ThresholdsCallback
from featstudy.errors import ConfigError


def _table4(tiny) -> list[dict]:
    with open(tiny.out / "tables" / "table4.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_off_by_default_writes_and_logs_nothing(tiny):
    ctx = tiny.context()
    ThresholdsCallback().run(ctx)
    before = (tiny.out / "tables" / "table4.csv").read_bytes()
    result = BootstrapCallback().run(ctx)
    assert result.metrics == {} and result.files == []
    assert (tiny.out / "tables" / "table4.csv").read_bytes() == before


@pytest.mark.parametrize("level", [0.95, 0.5])
def test_intervals_are_the_percentiles_of_the_replicates_and_join_table4(tiny, level):
    from featstudy import stats

    ctx = tiny.context(bins=None, seed=3, permutations=2)
    ThresholdsCallback().run(ctx)
    row_before = _table4(tiny)[0]
    result = BootstrapCallback(n_boot=4, level=level).run(ctx)
    boot = result.objects["bootstrap"]
    # the run's own settings reached the bootstrap: the same call made here gives the same replicates
    again = stats.bootstrap_thresholds(tiny.features, tiny.labels, n_boot=4, seed=3, bins=None, permutations=2,
                                       step=0.001, level=level)
    np.testing.assert_array_equal(boot.t_plus, again.t_plus)
    np.testing.assert_array_equal(boot.t_minus, again.t_minus)
    tail = 100 * (1 - level) / 2
    m = result.metrics
    assert (m["t_plus_ci_low"], m["t_plus_ci_high"]) == pytest.approx(tuple(np.percentile(again.t_plus,
                                                                                          [tail, 100 - tail])))
    assert (m["t_minus_ci_low"], m["t_minus_ci_high"]) == pytest.approx(tuple(np.percentile(again.t_minus,
                                                                                            [tail, 100 - tail])))
    row = _table4(tiny)[0]
    for key, value in row_before.items():  # the thresholds callback's columns are untouched
        assert row[key] == value
    for key in ("t_plus_ci_low", "t_plus_ci_high", "t_minus_ci_low", "t_minus_ci_high"):
        assert float(row[key]) == pytest.approx(m[key], rel=1e-5)
    assert row["bootstrap_replicates"] == "4" and float(row["bootstrap_level"]) == level
    replicates = list(csv.DictReader(open(tiny.out / "tables" / "bootstrap.csv", encoding="utf-8")))
    assert [float(r["t_plus"]) for r in replicates] == pytest.approx(again.t_plus.tolist(), rel=1e-5)


def test_a_second_run_replaces_the_interval_columns_instead_of_adding_more(tiny):
    ctx = tiny.context()
    ThresholdsCallback().run(ctx)
    BootstrapCallback(n_boot=2).run(ctx)
    BootstrapCallback(n_boot=3).run(ctx)
    header = next(csv.reader(open(tiny.out / "tables" / "table4.csv", encoding="utf-8")))
    assert header.count("t_plus_ci_low") == 1 and _table4(tiny)[0]["bootstrap_replicates"] == "3"


@pytest.mark.parametrize("n_boot,level,key", [(-1, 0.95, "analysis.bootstrap"), (1.5, 0.95, "analysis.bootstrap"),
                                              (True, 0.95, "analysis.bootstrap"), ("10", 0.95, "analysis.bootstrap"),
                                              (10, 1.0, "analysis.bootstrap_level"),
                                              (10, 0.0, "analysis.bootstrap_level"),
                                              (10, 95, "analysis.bootstrap_level")])
def test_bad_settings_are_one_line_naming_the_key(n_boot, level, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        check_bootstrap(n_boot, level)
    with pytest.raises(ConfigError, match=rf"^{key}="):
        BootstrapCallback(n_boot=n_boot, level=level)


def test_the_config_refuses_them_before_any_work(helpers):
    from featstudy.config import validate

    with pytest.raises(ConfigError, match=r"^analysis\.bootstrap=-2"):
        validate(helpers.compose(["analysis.bootstrap=-2"]))
    with pytest.raises(ConfigError, match=r"^analysis\.bootstrap_level=1\.5"):
        validate(helpers.compose(["analysis.bootstrap_level=1.5"]))
    validate(helpers.compose(["analysis.bootstrap=3", "analysis.bootstrap_level=0.9"]))
