"""Report generation probes: tokenizer, decoding, decoder, LLM + LoRA, nearest neighbour, runner."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.evaluation.report_generation import METRICS
from voxelfm.evaluation.results import BootstrapSettings
from voxelfm.evaluation.run import run_task
from voxelfm.evaluation.tasks import EvaluationTask
from voxelfm.extract.extractor import Features
from voxelfm.extract.store import EmbeddingRecord, EmbeddingStore, write_embeddings
from voxelfm.probes.report_generation import (
    DecoderSettings,
    LLMSettings,
    ReportSettings,
    ReportTokenizer,
    beam_search,
    fit_decoder,
    fit_llm,
    fit_nearest_neighbour,
    greedy_decode,
)
from voxelfm.stats.text_metrics import corpus_bleu

NODULE = (
    "FINDINGS: A 21 mm solid nodule in the right lower lobe. Unremarkable liver. "
    "IMPRESSION: Pulmonary nodule, 21 mm, right lower lobe."
)
NORMAL = "FINDINGS: The lungs are clear. Unremarkable liver. IMPRESSION: Normal study."
TINY = DecoderSettings(width=64, n_layers=2, n_heads=4, max_epochs=25, patience=25, batch_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run fastest (and identically) on one thread of a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_classes(n: int, seed: int, n_tokens: int = 1, dim: int = 16):
    """(n, T, D) inputs whose first feature says nodule / normal, and the matching reports."""
    rng = np.random.default_rng(seed)
    label = np.arange(n) % 2
    inputs = rng.normal(size=(n, n_tokens, dim)).astype(np.float32)
    inputs[:, :, 0] += 3.0 * (2 * label[:, None] - 1)
    return inputs, [NODULE if y else NORMAL for y in label]


def test_tokenizer_learns_from_train_only_and_round_trips(tmp_path):
    tokenizer = ReportTokenizer.train([NODULE, NORMAL])
    assert tokenizer.decode(tokenizer.encode(NORMAL)) == (
        "Findings: The lungs are clear. Unremarkable liver. Impression: Normal study."
    )
    # Sizes are spelled in digits, so a size never seen in training is still known.
    assert tokenizer.decode(tokenizer.encode("A 37 mm nodule.")) == "A 37 mm nodule."
    assert tokenizer.unk_id in tokenizer.encode("hepatomegaly")  # not in the training reports
    loaded = ReportTokenizer.load(tokenizer.save(tmp_path / "tokenizer.json"))
    assert loaded.encode(NODULE) == tokenizer.encode(NODULE)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
    with pytest.raises(InputError):
        ReportTokenizer.load(tmp_path / "missing.json")


def _toy_step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Ids: 0 pad, 1 bos, 2 eos, 3 a, 4 b. Greedy takes "a a" (0.24), beam finds "b" (0.36)."""
    table = {
        (1,): [0.0, 0.0, 0.0, 0.6, 0.4],
        (1, 3): [0.0, 0.0, 0.3, 0.4, 0.3],
        (1, 4): [0.0, 0.0, 0.9, 0.05, 0.05],
    }
    probs = [table.get(tuple(p), [0.0, 0.0, 1.0, 0.0, 0.0]) for p in prefix.tolist()]
    return torch.tensor(probs).clamp(min=1e-12).log()


def test_beam_search_beats_greedy_on_a_known_model():
    settings = {"bos_id": 1, "eos_id": 2, "max_new_tokens": 5}
    assert greedy_decode(_toy_step, 1, **settings) == [[3, 3]]
    assert beam_search(_toy_step, 1, beam_size=1, **settings) == [[3, 3]]
    assert beam_search(_toy_step, 1, beam_size=2, length_penalty=0.0, **settings) == [[4]]


def test_decoder_learns_a_trivial_mapping_reproducibly():
    x_train, r_train = two_classes(24, seed=0)
    x_val, r_val = two_classes(8, seed=1)
    x_test, r_test = two_classes(10, seed=2)
    probe = fit_decoder(x_train, r_train, x_val, r_val, settings=TINY, seed=3)
    generated = probe.generate(x_test)
    assert corpus_bleu(generated, r_test) > 0.95
    # Beam 1 is greedy; a wider beam finds the same (confident) reports here.
    assert probe.generate(x_test, beam_size=1) == generated
    assert probe.generate(x_test, beam_size=3) == generated
    # Same inputs and seed: same weights, same text.
    again = fit_decoder(x_train, r_train, x_val, r_val, settings=TINY, seed=3)
    assert again.generate(x_test) == generated
    for a, b in zip(probe.network.parameters(), again.network.parameters()):
        assert torch.equal(a, b)


def test_greedy_equals_beam_one_on_an_untrained_decoder():
    x, reports = two_classes(6, seed=0, n_tokens=8)
    untrained = DecoderSettings(width=32, n_layers=1, n_heads=2, max_epochs=1, max_new_tokens=12)
    probe = fit_decoder(x, reports, x, reports, settings=untrained, seed=0)
    # Random-ish weights: long, varied sequences, a fair test of the two code paths.
    greedy = probe.generate(x, beam_size=1)
    step_settings = {"bos_id": probe.tokenizer.bos_id, "eos_id": probe.tokenizer.eos_id}
    memory = probe.network.visual_tokens(torch.from_numpy(x))

    def step(rows, prefix):
        return probe.network.logits(memory[rows], prefix)[:, -1].log_softmax(-1)

    with torch.no_grad():
        beam_ids = beam_search(step, len(x), beam_size=1, max_new_tokens=12, **step_settings)
    assert [probe.tokenizer.decode(ids) for ids in beam_ids] == greedy


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 and its tokenizer, saved locally (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llm")
    words = ReportTokenizer.train([NODULE, NORMAL])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words._tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(folder)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=words.vocab_size, n_positions=128,
        bos_token_id=words.bos_id, eos_token_id=words.eos_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_llm_probe_trains_lora_and_generates(tiny_llm):
    x_train, r_train = two_classes(8, seed=0)
    x_val, r_val = two_classes(4, seed=1)
    settings = LLMSettings(llm_path=str(tiny_llm), max_epochs=1, batch_size=8, max_new_tokens=6)
    probe = fit_llm(x_train, r_train, x_val, r_val, settings=settings, seed=0)
    # One optimisation step happened: LoRA B matrices start at zero and have moved,
    # while the frozen GPT-2 weights are exactly those saved.
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_llm, local_files_only=True)
    lora_b = [p for n, p in probe.network.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    frozen = dict(probe.network.language_model.get_base_model().named_parameters())
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(frozen[name], dict(original.named_parameters())[name])
    generated = probe.generate(x_val)
    assert len(generated) == 4 and all(isinstance(text, str) for text in generated)
    assert probe.generate(x_val) == generated
    assert probe.generate(x_val, beam_size=2) is not None
    assert np.isfinite(probe.validation_loss)


def test_missing_llm_path_is_a_one_line_error(tmp_path):
    with pytest.raises(VoxelFMError, match="llm_path is required") as error:
        ReportSettings.from_mapping({}, task="reports", probes=("llm",))
    assert "\n" not in str(error.value)
    x, reports = two_classes(4, seed=0)
    missing = tmp_path / "no_model"
    with pytest.raises(InputError, match="not a folder") as error:
        fit_llm(x, reports, x, reports, settings=LLMSettings(llm_path=str(missing)))
    assert str(missing) in str(error.value) and "\n" not in str(error.value)


def test_options_are_checked():
    with pytest.raises(VoxelFMError, match="unknown key"):
        ReportSettings.from_mapping({"beams": 2})
    with pytest.raises(VoxelFMError, match="beam_size must be an integer"):
        ReportSettings.from_mapping({"beam_size": 0})
    with pytest.raises(VoxelFMError, match="not divisible"):
        ReportSettings.from_mapping({"width": 30, "n_heads": 4})
    assert ReportSettings.from_mapping({"beam_size": 3}).decoder_settings().beam_size == 3


def test_nearest_neighbour_copies_the_closest_training_report():
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    probe = fit_nearest_neighbour(train, ["first", "second"])
    # Cosine, not Euclidean: the long vector along the first axis is closest to "first".
    assert probe.generate(np.array([[10.0, 1.0], [0.1, 0.3]])) == ["first", "second"]


def _write_store(path, table: pd.DataFrame, seed: int = 0):
    """A real embedding store: patch tokens (2, 2, 2, 8) whose mean says nodule or normal."""
    rng = np.random.default_rng(seed)
    records = []
    for row in table.itertuples():
        patch = rng.normal(size=(2, 2, 2, 8)).astype(np.float32)
        patch[..., 0] += 3.0 if row.report == NODULE else -3.0
        pooled = patch.mean(axis=(0, 1, 2))
        features = Features(
            cls=pooled, pooled=pooled, patch=patch, grid_affine=np.eye(4), grid_shape=(2, 2, 2),
            volume_shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
            mode="whole",
        )  # fmt: skip
        records.append(EmbeddingRecord(row.scan_id, row.patient_id, features))
    backbone = {"kind": "handcrafted", "name": "toy", "embed_dim": 8, "patch_size": 16}
    return EmbeddingStore(write_embeddings(path, records, backbone))


def test_runner_writes_every_metric_with_finite_intervals(tmp_path):
    n_patients = 30
    patients = [f"p{i:02d}" for i in range(n_patients) for _ in range(2)]
    splits = ["train"] * 36 + ["val"] * 8 + ["test"] * 16
    table = pd.DataFrame(
        {
            "scan_id": [f"{p}_s{j}" for p, j in zip(patients, [1, 2] * n_patients)],
            "patient_id": patients,
            "split": splits,
            "report": [NODULE if i % 3 else NORMAL for i in range(len(patients))],
        }
    )
    store = _write_store(tmp_path / "toy.zarr", table)
    task = EvaluationTask.from_config(
        "reports",
        {
            "category": "report_generation",
            "labels": ["report"],
            "probes": ["decoder", "nearest_neighbour"],
            "token_grid": [2, 2, 2],
            "options": {"width": 64, "n_layers": 2, "max_epochs": 20, "batch_size": 8},
        },
    )
    out = run_task(store, table, task, tmp_path / "result", bootstrap=BootstrapSettings(n_boot=50))
    metrics = pd.read_csv(out / "metrics.csv")
    for probe in ("decoder", "nearest_neighbour"):
        rows = metrics[metrics.probe == probe].set_index("metric")
        assert sorted(rows.index) == sorted(METRICS)
        assert np.isfinite(rows[["estimate", "ci_low", "ci_high"]].to_numpy()).all()
        assert (rows.ci_low <= rows.estimate + 1e-12).all()
        assert (rows.estimate <= rows.ci_high + 1e-12).all()
        assert (rows.n_test_patients == 8).all()
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == [
        "scan_id", "patient_id", "split", "reference", "generated:decoder",
        "generated:nearest_neighbour",
    ]  # fmt: skip
    assert (predictions.split == "test").all() and len(predictions) == 16
    # The metric rows are the metrics of the written text (independent recomputation).
    nn = metrics[(metrics.probe == "nearest_neighbour") & (metrics.metric == "bleu4")]
    expected = corpus_bleu(predictions["generated:nearest_neighbour"], predictions.reference)
    assert nn.estimate.item() == pytest.approx(expected)
    decoder = metrics[metrics.probe == "decoder"].set_index("metric").estimate
    assert decoder["bleu4"] > 0.9 and decoder["finding_f1"] == pytest.approx(1.0)
    assert "patch tokens pooled to (2, 2, 2)" in metrics[metrics.probe == "decoder"].note.iloc[0]
    assert (out / "decoder" / "tokenizer.json").is_file()
