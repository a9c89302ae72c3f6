"""Report generation from frozen features: a language probe of a CT backbone.

* ``tokenizer``: word-level tokenizer learned from the training reports (``tokenizers``).
* ``projector``: attentional pooling of the frozen visual inputs to a few visual tokens.
* ``decoder``: the default probe, a small transformer decoder trained from scratch.
* ``llm``: a local causal language model adapted with LoRA, visual tokens as its prefix.
* ``nearest``: the baseline, the report of the nearest training scan.
* ``decoding``: greedy and beam-search decoding shared by the generating probes.
* ``options``: the task's ``options`` and their defaults.

The evaluation (metrics, bootstrap, predictions.csv) is
``voxelfm.evaluation.report_generation``. Importing this package imports torch and
``tokenizers``; ``transformers`` and ``peft`` are imported only when the llm probe is fitted.
"""

from voxelfm.probes.report_generation.decoder import (
    DecoderProbe,
    DecoderSettings,
    fit_decoder,
)
from voxelfm.probes.report_generation.decoding import beam_search, decode, greedy_decode
from voxelfm.probes.report_generation.llm import LLMProbe, LLMSettings, fit_llm, load_causal_lm
from voxelfm.probes.report_generation.nearest import NearestNeighbourProbe, fit_nearest_neighbour
from voxelfm.probes.report_generation.options import ReportSettings
from voxelfm.probes.report_generation.tokenizer import ReportTokenizer

__all__ = [
    "DecoderProbe",
    "DecoderSettings",
    "LLMProbe",
    "LLMSettings",
    "NearestNeighbourProbe",
    "ReportSettings",
    "ReportTokenizer",
    "beam_search",
    "decode",
    "fit_decoder",
    "fit_llm",
    "fit_nearest_neighbour",
    "greedy_decode",
    "load_causal_lm",
]
