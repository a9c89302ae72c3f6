"""Probes on frozen features: the numeric core of the global evaluation.

Every probe follows one contract (see ``fitted.py``): ``fit_select_*(X_train, y_train, X_val,
y_val, *, seed)`` fits on the training split, chooses its hyper-parameters on the validation
split only and returns a ``FittedProbe``; test data is passed afterwards, once, to
``registry.evaluate``. Selection code never receives test rows because no function that
selects takes them.

Target conventions (one per task):

* classification: ``y`` (n,) integer classes 0..C-1 (binary: 0/1), or (n, L) 0/1 multi-label;
  scores are P(positive) (n,) for binary, class probabilities (n, C), or label probabilities (n, L).
* regression: ``y`` (n,) float; scores are predictions (n,).
* survival: ``y`` (n, 2) float with columns (time, event), event 1 = observed, 0 = censored;
  scores are risks (n,), higher = shorter expected survival.

Importing this package does not import torch; only the network probes
(``attentive``, ``mlp_regression``, ``cox_mlp`` and their shared ``networks``) do.
"""
