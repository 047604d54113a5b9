"""``python -m spikemar.eval ...``: lm_eval's own command line with ``--model spikemar`` known.

The stock ``lm_eval`` command of lm-evaluation-harness 0.4.13 cannot find a model that lives
outside lm_eval: ``get_model`` looks the name up in lm_eval's registry, which holds its own
models (``lm_eval/models/__init__.py``'s table) and whatever was imported before; nothing reads
package entry points, no option or environment variable imports a module (``--include_path`` is
for task YAMLs), and an unknown ``--model`` is an error. So this is the same command with
:mod:`spikemar.eval.harness` imported first (which registers ``spikemar``); every argument is
lm_eval's::

    python -m spikemar.eval run --model spikemar \\
        --model_args checkpoint=spikemar/assets/mar_shakespeare.pt \\
        --tasks shakespeare_nextline --include_path spikemar/eval/tasks

:func:`main` is also the ``spikemar-lm-eval`` console script, where the installed package
declares it.
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:
    """Run lm_eval's command line (``sys.argv``) with spikemar's model registered."""
    from lm_eval.__main__ import cli_evaluate

    from . import harness  # noqa: F401  registers --model spikemar

    cli_evaluate()


if __name__ == "__main__":
    main()
