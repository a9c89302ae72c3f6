"""Self-distillation learns: the DINO loss falls well below log K and the teacher's CLS
recovers the identity of crops from held-out volumes far better than its initial weights.

The data and the training loop are ``benchmarks/ssl_toy_learning.py`` (its docstring): 13
identities, a stripe orientation each, under smooth random blobs; 600 tiny-preset steps
through ``build_ssl_dataloader`` and ``Pretrainer.train_step``. Checked by hand to fail when
the teacher's two views are swapped (each student global crop meets its own view) and when
the student gets no gradient.
"""

from __future__ import annotations

import importlib.util
import math
import signal
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ssl_toy_learning.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("ssl_toy_learning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def _process_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    # Pretrainer installs SIGTERM/SIGUSR1 handlers; keep pytest killable afterwards.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    torch.set_num_threads(threads)


def test_pretraining_learns_the_cross_view_identity(toy, tmp_path):
    losses, accuracies = toy.train_and_probe(tmp_path, log_every=10**9)
    log_k = math.log(toy.RECIPE["dino"]["head_n_prototypes"])
    teacher, initial = accuracies["texture"]
    print(
        f"DINO loss {losses[-20:].mean():.3f} (log K {log_k:.3f}); texture 1-NN "
        f"teacher {teacher:.3f}, initial {initial:.3f}"
    )
    assert losses[-20:].mean() < 0.5 * log_k
    assert teacher >= initial + 0.2
    assert teacher >= 0.6
