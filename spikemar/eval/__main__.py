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
        --tasks shakespeare_nextline

spikemar's local tasks (``shakespeare_nextline``, ``shakespeare_speaker``,
``shakespeare_rolling``: :data:`spikemar.eval.TASKS_DIR`) are found without ``--include_path``
(they are its default here); an ``--include_path`` of your own replaces that default, as
lm_eval takes one folder (add ``spikemar/eval/tasks``'s YAMLs to yours to have both).

:func:`main` is also the ``spikemar-lm-eval`` console script, where the installed package
declares it.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def with_local_tasks(argv: list[str]) -> list[str]:
    """``argv`` (``sys.argv``: the program first) with spikemar's task folder as
    ``--include_path`` when a command is given and no ``--include_path`` is."""
    from .local_tasks import TASKS_DIR

    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        return list(argv)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv[1:]):
        return list(argv)
    return [*argv, "--include_path", str(TASKS_DIR)]


def main() -> None:
    """Run lm_eval's command line (``sys.argv``) with spikemar's model registered and its local
    tasks on the include path."""
    from lm_eval.__main__ import cli_evaluate

    from . import harness  # noqa: F401  registers --model spikemar

    sys.argv = with_local_tasks(sys.argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
