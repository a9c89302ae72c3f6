"""C-index convention, the penalised Cox probe and Kaplan-Meier risk groups."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2

from voxelfm.errors import VoxelFMError
from voxelfm.probes.survival import (
    fit_select_cox,
    harrell_c_index,
    kaplan_meier_risk_groups,
    max_components,
)


def simulated_cohort(n: int = 300, d: int = 24, seed: int = 0):
    """Embeddings with a 3-d latent structure; the log-hazard is 1.5 x the first latent factor.

    Returns X (n, d), y (n, 2) = (time, event) with ~30% censoring, and the true log-hazard.
    """
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 3))
    X = latent @ rng.normal(size=(3, d)) + 0.5 * rng.normal(size=(n, d))
    log_hazard = 1.5 * latent[:, 0]
    event_time = rng.exponential(1 / np.exp(log_hazard))
    censor_time = rng.exponential(2.5, size=n)
    y = np.stack(
        [np.minimum(event_time, censor_time), (event_time <= censor_time).astype(float)], 1
    )
    return X, y, log_hazard


def _harrell_by_pairs(y, risk):
    """Comparable pairs: the earlier time is an event; concordant if it has the higher risk."""
    concordant = comparable = 0.0
    for i in range(len(y)):
        for j in range(len(y)):
            if y[i, 1] == 1 and y[i, 0] < y[j, 0]:
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def test_c_index_sign_higher_risk_means_shorter_survival():
    y = np.array([[1.0, 1], [2.0, 1], [3.0, 0], [4.0, 1]])
    assert harrell_c_index(y, -y[:, 0]) == 1.0
    assert harrell_c_index(y, y[:, 0]) == 0.0


def test_c_index_matches_pair_counting_with_censoring_and_ties():
    _, y, log_hazard = simulated_cohort(n=40, seed=1)
    risk = np.round(log_hazard, 1)  # rounding creates tied risks
    assert harrell_c_index(y, risk) == pytest.approx(_harrell_by_pairs(y, risk))
    assert np.isnan(harrell_c_index(np.array([[1.0, 0], [2.0, 0]]), np.array([1.0, 0.0])))


def test_cox_probe_recovers_the_simulated_hazard():
    X, y, log_hazard = simulated_cohort()
    probe = fit_select_cox(
        X[:180],
        y[:180],
        X[180:240],
        y[180:240],
        n_components_grid=(2, 4, 8),
        penalizer_grid=(1.0, 0.01),
    )
    test_c = harrell_c_index(y[240:], probe.predict(X[240:]))
    assert test_c > 0.7
    assert test_c > harrell_c_index(y[240:], log_hazard[240:]) - 0.08  # near the oracle
    assert len(probe.selection_trace) == 6


def test_component_count_is_capped_by_events():
    assert max_components(n_train=500, n_features=768, n_events=40) == 8
    assert max_components(n_train=500, n_features=768, n_events=3) == 1
    X, y, _ = simulated_cohort(n=120)
    y[:, 1] = 0
    y[::8, 1] = 1  # 10 training events -> at most 2 components, however large the grid
    probe = fit_select_cox(
        X[:80], y[:80], X[80:], y[80:], n_components_grid=(2, 16), penalizer_grid=(1.0,)
    )
    assert [c["n_components"] for c in probe.selection_trace] == [2]


def test_survival_targets_are_validated():
    X, y, _ = simulated_cohort(n=40)
    y[0, 0] = -1
    with pytest.raises(VoxelFMError, match="positive"):
        fit_select_cox(X, y, X, y)


def _kaplan_meier_by_hand(time, event):
    """Product-limit estimate at each distinct event time."""
    survival, curve = 1.0, {}
    for t in np.unique(time[event == 1]):
        at_risk = (time >= t).sum()
        survival *= 1 - ((time == t) & (event == 1)).sum() / at_risk
        curve[t] = survival
    return curve


def _logrank_by_hand(time, event, group):
    """Two-group log-rank chi-square (observed - expected in group 1, hypergeometric variance)."""
    observed_minus_expected = variance = 0.0
    for t in np.unique(time[event == 1]):
        at_risk = time >= t
        n, n1 = at_risk.sum(), (at_risk & group).sum()
        d = ((time == t) & (event == 1)).sum()
        d1 = ((time == t) & (event == 1) & group).sum()
        observed_minus_expected += d1 - d * n1 / n
        if n > 1:
            variance += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    return observed_minus_expected**2 / variance


def test_kaplan_meier_groups_split_at_the_training_median():
    _, y, log_hazard = simulated_cohort(n=200, seed=2)
    train_risk, test_risk, y_test = log_hazard[:100], log_hazard[100:], y[100:]
    groups = kaplan_meier_risk_groups(train_risk, test_risk, y_test)
    assert groups.threshold == np.median(train_risk)
    is_high = test_risk > np.median(train_risk)
    assert groups.group_sizes == {
        "low risk": int((~is_high).sum()),
        "high risk": int(is_high.sum()),
    }
    high = groups.curves["high risk"].set_index("time")["survival"]
    for t, s in _kaplan_meier_by_hand(y_test[is_high, 0], y_test[is_high, 1]).items():
        assert high.loc[t] == pytest.approx(s)
    statistic = _logrank_by_hand(y_test[:, 0], y_test[:, 1], is_high)
    assert groups.logrank_statistic == pytest.approx(statistic)
    assert groups.logrank_p_value == pytest.approx(chi2.sf(statistic, df=1))
    assert groups.logrank_p_value < 0.01  # the true hazard separates the groups


def test_kaplan_meier_with_an_empty_group_has_no_logrank():
    _, y, _ = simulated_cohort(n=20)
    groups = kaplan_meier_risk_groups(np.zeros(10), -np.ones(10), y[10:])
    assert list(groups.curves) == ["low risk"] and np.isnan(groups.logrank_p_value)
