"""Evaluation: zero-shot tasks through lm-evaluation-harness, perplexity, and energy per token.

    from spikemar.eval import Scorer, text_perplexity
    Scorer(model, vocab_size).loglikelihood([(context_ids, continuation_ids), ...])
    text_perplexity(model, tokenizer, text, window=None)     # nats/token, bits/byte, curve

    python -m spikemar.eval run --model spikemar --model_args checkpoint=PATH --tasks ...
    spikemar-lm-eval run --model spikemar ...               # the same, as a console script
    spikemar eval --checkpoint A --checkpoint B --tasks shakespeare_nextline,... --out DIR
    spikemar eval --checkpoint A --text FILE [--window 64]

* :mod:`~spikemar.eval.scoring`: batched loglikelihood, rolling loglikelihood (a document in one
  recurrent pass) and greedy generation on token ids, with an optional energy counter on the
  same passes; ``load_model`` (a spikemar checkpoint file, or a Hugging Face Mamba-2/Llamba
  directory or Hub id, with its tokenizer);
* :mod:`~spikemar.eval.harness` (needs ``lm_eval``, the ``eval`` extra): ``SpikemarLM``,
  registered in lm_eval as ``spikemar``; imported on demand, so ``spikemar.eval`` itself never
  needs lm_eval (where lm_eval is installed, importing ``spikemar.eval`` names ``spikemar`` in
  its registry lazily: :func:`register_with_lm_eval`);
* :mod:`~spikemar.eval.local_tasks`: offline Tiny Shakespeare tasks in lm_eval's YAML format
  (``spikemar/eval/tasks/``);
* :mod:`~spikemar.eval.perplexity`: perplexity of a text file with the per-position loss curve;
* :mod:`~spikemar.eval.report` and :mod:`~spikemar.eval.cli`: the MAR-Table-2-style table
  (accuracy ± stderr, perplexity, energy per token under each hardware profile, firing rates),
  its JSON, Markdown and accuracy-vs-energy PNG, and ``spikemar eval``.
"""

from .local_tasks import LOCAL_TASKS, TASKS_DIR, build_shakespeare_tasks
from .perplexity import PerplexityResult, save_curves, start_token, text_perplexity
from .scoring import ContinuationScore, Scorer, load_model, model_max_length

HARNESS_MODEL = "spikemar.eval.harness:SpikemarLM"


def register_with_lm_eval(registry=None) -> bool:
    """Name ``spikemar`` in lm_eval's model registry (or ``registry``) as a lazy entry: the
    class is imported when lm_eval first asks for it, so ``import spikemar.eval`` is enough for
    ``lm_eval.simple_evaluate(model="spikemar", ...)``. Done on import where lm_eval is
    installed (~0.1 s: its registry and its models' lazy table, imported first as
    :mod:`~spikemar.eval.harness` does); False where it is not, or it is already named."""
    try:
        if registry is None:
            import lm_eval.models  # noqa: F401  lm_eval's own models first (see harness)
            from lm_eval.api.registry import model_registry as registry
        if "spikemar" in registry:
            return False
        registry.register("spikemar", target=HARNESS_MODEL)
    except Exception:  # no (or a broken) lm_eval: importing the harness says what is wrong
        return False
    return True


register_with_lm_eval()

__all__ = [
    "HARNESS_MODEL",
    "LOCAL_TASKS",
    "TASKS_DIR",
    "ContinuationScore",
    "PerplexityResult",
    "Scorer",
    "build_shakespeare_tasks",
    "load_model",
    "model_max_length",
    "register_with_lm_eval",
    "save_curves",
    "start_token",
    "text_perplexity",
]
