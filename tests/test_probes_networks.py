"""Network probes (torch): Cox partial likelihood, MLP Cox, MLP regressor, attentive pooling."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_probes_survival import simulated_cohort

from voxelfm.probes.attentive import fit_select_attentive
from voxelfm.probes.classification import auroc, fit_select_logistic
from voxelfm.probes.cox_mlp import cox_negative_log_partial_likelihood, fit_select_mlp_cox
from voxelfm.probes.mlp_regression import fit_select_mlp_regressor
from voxelfm.probes.regression import r_squared
from voxelfm.probes.survival import harrell_c_index


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks run faster on one thread, and the test machine's cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _breslow_by_hand(risk, time, event):
    """-(1/#events) sum over events of [risk_i - log sum_{t_j >= t_i} exp(risk_j)]."""
    terms = [
        risk[i] - np.log(np.exp(risk[time >= time[i]]).sum()) for i in range(len(risk)) if event[i]
    ]
    return -np.sum(terms) / event.sum()


def test_cox_loss_is_the_breslow_partial_likelihood_with_ties():
    time = np.array([5.0, 3.0, 3.0, 8.0, 1.0, 3.0, 8.0])  # tie groups at 3 and 8
    event = np.array([1, 1, 0, 1, 1, 1, 0], dtype=float)
    risk = np.array([0.3, -1.2, 0.8, 0.1, 2.0, -0.4, 0.5])
    loss = cox_negative_log_partial_likelihood(
        torch.tensor(risk), torch.tensor(np.stack([time, event], 1))
    )
    assert loss.item() == pytest.approx(_breslow_by_hand(risk, time, event))


def test_mlp_cox_recovers_the_simulated_hazard_and_is_reproducible():
    X, y, _ = simulated_cohort(n=240)
    split = (X[:140], y[:140], X[140:190], y[140:190])
    probe = fit_select_mlp_cox(*split, max_epochs=60, patience=10, seed=1)
    assert harrell_c_index(y[190:], probe.predict(X[190:])) > 0.7
    # Early stopping returns the best epoch's weights, whose score is the recorded one.
    assert probe.validation_score == max(c["validation_score"] for c in probe.selection_trace)
    assert harrell_c_index(y[140:190], probe.predict(X[140:190])) == pytest.approx(
        probe.validation_score
    )
    again = fit_select_mlp_cox(*split, max_epochs=60, patience=10, seed=1)
    np.testing.assert_array_equal(probe.predict(X[190:]), again.predict(X[190:]))


def test_mlp_regressor_learns_a_nonlinear_target_on_its_original_scale():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    y = 50 + 10 * X[:, 0] ** 2 + rng.normal(size=300)  # e.g. an age in years
    probe = fit_select_mlp_regressor(
        X[:200], y[:200], X[200:250], y[200:250], max_epochs=150, patience=15, seed=0
    )
    assert r_squared(y[250:], probe.predict(X[250:])) > 0.6
    assert (
        probe.hyperparameters["epochs"]
        == int(np.argmax([c["validation_score"] for c in probe.selection_trace])) + 1
    )


def test_attentive_probe_finds_a_single_informative_patch_better_than_mean_pooling():
    """The finding is one patch at a random position, diluted 16-fold by mean pooling."""
    rng = np.random.default_rng(0)
    n, n_patches, dim = 240, 16, 16
    direction = rng.normal(size=dim)
    direction -= direction.mean()  # orthogonal to the shift that LayerNorm removes
    direction /= np.linalg.norm(direction)
    tokens = rng.normal(size=(n, n_patches, dim)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    positive = np.flatnonzero(labels)
    tokens[positive, rng.integers(0, n_patches, len(positive))] += 6 * direction
    train, val, test = slice(0, 140), slice(140, 190), slice(190, None)
    probe = fit_select_attentive(
        tokens[train], labels[train], tokens[val], labels[val], max_epochs=40, patience=8, seed=0
    )
    attentive_auroc = auroc(labels[test], probe.predict(tokens[test]))
    pooled = tokens.mean(axis=1)
    mean_pooled = fit_select_logistic(pooled[train], labels[train], pooled[val], labels[val])
    assert attentive_auroc > 0.9
    assert attentive_auroc > auroc(labels[test], mean_pooled.predict(pooled[test])) + 0.03
    assert probe.predict(tokens[test]).shape == (50,)
    assert 0 < probe.decision_threshold < 1
