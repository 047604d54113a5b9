"""``python -m spikemar.eval ...``: lm_eval's own command line with ``--model spikemar`` known.

lm_eval 0.4.13 finds models only in its registry and discovers no plugins, so its ``lm_eval``
command cannot know spikemar's model; this runs the same command after importing
:mod:`spikemar.eval.harness` (which registers it). Every argument is lm_eval's::

    python -m spikemar.eval run --model spikemar \\
        --model_args checkpoint=spikemar/assets/mar_shakespeare.pt \\
        --tasks shakespeare_nextline --include_path spikemar/eval/tasks
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

from . import harness  # noqa: F401  registers --model spikemar

if __name__ == "__main__":
    cli_evaluate()
