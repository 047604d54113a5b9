"""spikemar.eval driven as its users drive it, with what the first tests did not try: lm_eval's
glob task names through ``spikemar eval``, a text with characters outside a character
tokenizer's alphabet, the metrics of tasks that are neither accuracy nor perplexity, and
``--model_args`` values lm_eval reads as numbers."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the 'eval' extra) is missing")

from spikemar import cli
from spikemar.checkpoint import save_checkpoint
from spikemar.data import CharTokenizer
from spikemar.models import MARLM, MARConfig, SpikeConfig

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(5)
    model = MARLM(MARConfig(vocab_size=len(CHARS), d_model=16, n_layers=1, d_state=8,
                            head_dim=8, spikes=SpikeConfig(T=2)))  # fmt: skip
    return save_checkpoint(tmp_path_factory.mktemp("c") / "tiny.pt", model, CharTokenizer(CHARS))


def test_eval_command_expands_a_glob_task_pattern():
    """``--tasks 'shakespeare_s*'`` was accepted as a known name and then handed to
    simple_evaluate unexpanded: 'KeyError: Spec ... is not a registered task', exit 1."""
    from spikemar.eval.cli import resolve_tasks

    names, manager = resolve_tasks(["shakespeare_s*", "shakespeare_speaker", "shakespeare_r*"], [])
    assert names == ["shakespeare_speaker", "shakespeare_rolling"]
    assert manager.match_tasks(names) == sorted(names)


def test_eval_text_takes_unk_and_names_its_flags(checkpoint, tmp_path, capsys):
    """``--text`` with characters outside the alphabet said 'text: ...' (the library's name)
    and ignored ``--unk ' '``; the task path's hint named lm_eval's ``model_args unk=``, and a
    corrupt checkpoint or bad --unk was 'checkpoint:'/'unk:' where other commands say the flag."""
    from spikemar.eval import text_perplexity
    from spikemar.eval.scoring import load_model

    text = tmp_path / "t.txt"
    text.write_text("Act 1, scene 2\nEnter Viola\n")
    out = tmp_path / "ppl"
    argv = ["eval", "--checkpoint", str(checkpoint), "--text", str(text), "--no-energy",
            "--out", str(out)]  # fmt: skip

    def error(*extra: str) -> str:
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    assert error().endswith("--text: characters ['1', '2'] are not in the tokenizer's vocabulary "
                            "of 65 (--unk ' ' replaces them)")  # fmt: skip
    assert error("--unk", "#").endswith("--unk: expected one character of the tokenizer's "
                                        "alphabet, got '#'")  # fmt: skip
    assert cli.main([*argv, "--unk", " "]) == 0
    warned = "outside the tokenizer's alphabet were scored as ' ': '12'"
    assert capsys.readouterr().err.count(warned) == 1  # once per model
    (got,) = json.loads((out / "perplexity.json").read_text())["results"]
    model, tok = load_model(checkpoint)
    want = text_perplexity(model, tok, text.read_text().replace("1", " ").replace("2", " "))
    assert got["nats_per_token"] == pytest.approx(want.nats_per_token, rel=1e-9)
    assert got["bytes"] == len(text.read_bytes())
    tasks = ["eval", "--checkpoint", str(checkpoint), "--tasks", "shakespeare_speaker",
             "--limit", "1", "--no-energy", "--out", str(tmp_path / "t")]  # fmt: skip
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint\n")
    assert cli.main([*tasks, "--checkpoint", str(bad)]) == 2
    assert "error: --checkpoint: " in capsys.readouterr().err
    assert cli.main([*tasks, "--unk", "#"]) == 2
    assert "error: --unk: expected one character" in capsys.readouterr().err


def test_harness_unknown_characters_hint_names_the_command_option(checkpoint):
    from lm_eval.api.instance import Instance

    from spikemar.eval.harness import SpikemarLM

    lm = SpikemarLM(checkpoint=checkpoint, count_energy=False)
    request = [Instance("loglikelihood", {}, ("Act 1", " scene"), 0)]
    with pytest.raises(ValueError, match=r"\(model_args unk=' ' replaces them\)$"):
        lm.loglikelihood(request)


_TASK_YAML = """task: tidy_rolling
custom_dataset: !function tidy_docs.docs
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""
_TASK_DOCS = """import datasets


def docs(**_):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": "Act 1, scene 2"}])})
"""


def test_eval_tasks_say_unk_by_its_flag_and_warn_once(checkpoint, tmp_path, capfd, monkeypatch):
    """A task's characters outside the alphabet: the error's way out is --unk, not the harness's
    lm_eval model_args (eval set an attribute on its model to change it, beside the one
    mechanism of command_line_hint); with --unk one warning line per model, and outside a git
    checkout no "fatal: not a git repository" from lm_eval's `git describe` (capfd: git wrote
    it to the terminal, not through Python)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tidy_rolling.yaml").write_text(_TASK_YAML)
    (tasks / "tidy_docs.py").write_text(_TASK_DOCS)
    common = ["eval", "--checkpoint", str(checkpoint), "--no-energy", "--out", str(tmp_path / "o")]
    task = ["--tasks", "tidy_rolling", "--include-path", str(tasks)]
    assert cli.main([*common, *task]) == 2
    assert capfd.readouterr().err.splitlines()[-1] == (
        "spikemar eval: error: --tasks: characters ['1', '2'] are not in the tokenizer's "
        "vocabulary of 65 (--unk ' ' replaces them)"
    )
    assert cli.main([*common, *task, "--unk", " "]) == 0
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if "alphabet" in line] == [
        "tiny: characters outside the tokenizer's alphabet were scored as ' ': '12'"
    ]
    assert "not a git repository" not in err, err


def test_a_generation_tasks_metrics_reach_the_table():
    """A generate_until task (``exact_match``, per filter, lm_eval's numpy floats) was scored
    and then dropped: neither the JSON nor the Markdown held anything of it."""
    import numpy as np

    from spikemar.eval.report import EvalTable, row_from_lm_eval

    results = {"results": {
        "gen": {"alias": "gen", "exact_match,strict-match": np.float64(0.25),
                "exact_match_stderr,strict-match": 0.1, "exact_match,flexible-extract": 0.5,
                "exact_match_stderr,flexible-extract": "N/A"},
        "mc": {"acc,none": 0.5, "acc_stderr,none": 0.2, "acc_norm,none": np.float32(0.75)},
    }}  # fmt: skip
    row = row_from_lm_eval("m", "m.pt", results)
    assert row.tasks["gen"] == {"exact_match,strict-match": 0.25,
                                "exact_match_stderr,strict-match": 0.1,
                                "exact_match,flexible-extract": 0.5}  # fmt: skip
    assert row.tasks["mc"] == {"acc": 0.5, "acc_stderr": 0.2, "acc_norm": 0.75}
    head, _, cells = EvalTable([row]).to_markdown().splitlines()[:3]
    assert "| gen (exact_match,strict-match) | gen (exact_match,flexible-extract) |" in head
    assert "| 0.25 ± 0.1 | 0.5 |" in cells and row.average_accuracy() == (0.5, 0.2 / 1)


def test_average_accuracy_counts_a_group_once_not_beside_its_members():
    """``--tasks mmlu,piqa``: lm_eval reports the group's aggregate beside each of its tasks
    (and subgroups); the average took them all, the group counted with its own members."""
    from spikemar.eval.report import row_from_lm_eval

    def acc(a: float, se: float) -> dict:
        return {"acc,none": a, "acc_stderr,none": se}

    results = {
        "results": {"law": acc(0.2, 0.1), "art": acc(0.4, 0.1), "humanities": acc(0.3, 0.07),
                    "mmlu": acc(0.3, 0.07), "piqa": acc(0.7, 0.05)},
        "group_subtasks": {"mmlu": ["humanities"], "humanities": ["law", "art"], "piqa": []},
    }  # fmt: skip
    row = row_from_lm_eval("m", "m.pt", results)
    mean, se = row.average_accuracy()
    assert mean == pytest.approx((0.3 + 0.7) / 2)
    assert se == pytest.approx((0.07**2 + 0.05**2) ** 0.5 / 2)
    assert row.groups == {"mmlu": ["humanities"], "humanities": ["law", "art"]}
    # a group without an aggregate of its own (a tag-like group) leaves its members counted
    del results["results"]["mmlu"], results["results"]["humanities"]
    assert row_from_lm_eval("m", "m.pt", results).average_accuracy()[0] == pytest.approx(
        (0.2 + 0.4 + 0.7) / 3
    )


def test_model_args_a_number_for_a_name_is_named(checkpoint):
    """lm_eval's ``--model_args checkpoint=2024`` hands the int 2024: it was torch's
    'expected str, bytes or os.PathLike object, not int', naming no argument."""
    from spikemar.eval import load_model
    from spikemar.eval.harness import SpikemarLM

    with pytest.raises(ValueError, match=r"^checkpoint: got the number 2024 .*checkpoint='2024'"):
        SpikemarLM.create_from_arg_string("checkpoint=2024")
    with pytest.raises(ValueError, match=r"^pretrained: got the number 7\b"):
        SpikemarLM.create_from_arg_string("pretrained=7")
    with pytest.raises(TypeError, match=r"^checkpoint: expected a file, a directory or a Hub id"):
        load_model(None)
    lm = SpikemarLM.create_from_arg_string(f"checkpoint='{checkpoint}',count_energy=false")
    assert lm.checkpoint == str(checkpoint)


def _own_task(folder, name: str = "own_mc") -> None:
    """A multiple-choice task of one's own as README's 'Your own tasks' describes it."""
    data = folder / f"{name}.jsonl"
    docs = [{"q": "ROMEO: what light through yonder", "choices": [" window", " door"], "label": 0},
            {"q": "JULIET: O Romeo, Romeo", "choices": ["!", "?"], "label": 0}]  # fmt: skip
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )


def test_eval_command_takes_a_task_yaml_path_as_lm_eval_does(checkpoint, tmp_path, capsys):
    """lm_eval's --tasks takes the path of a task YAML; spikemar eval called it an unknown task
    (and a missing file the same)."""
    _own_task(tmp_path)
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(checkpoint), "--limit", "2", "--no-energy", "--out",
            str(out), "--tasks"]  # fmt: skip
    assert cli.main([*argv, f"{tmp_path / 'own_mc.yaml'},shakespeare_speaker"]) == 0
    (row,) = json.loads((out / "eval.json").read_text())["rows"]
    assert list(row["tasks"]) == ["shakespeare_speaker", "own_mc"]
    capsys.readouterr()
    assert cli.main([*argv, str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"spikemar eval: error: --tasks: no task file at {tmp_path}/none.yaml")


def test_the_table_says_when_it_is_not_zero_shot():
    """``--num-fewshot 5`` gave a table that read exactly like a zero-shot one: the shots were
    neither in the JSON nor in the Markdown."""
    from spikemar.eval.report import EvalTable, row_from_lm_eval

    def results(shots: int) -> dict:
        return {"results": {"mc": {"acc,none": 0.5}}, "n-shot": {"mc": shots}}

    zero, five = row_from_lm_eval("a", "a.pt", results(0)), row_from_lm_eval("b", "b", results(5))
    assert zero.shots == {"mc": 0} and five.shots == {"mc": 5}
    assert "Few-shot" not in EvalTable([zero]).to_markdown()
    assert (
        "Few-shot examples per task: mc 5 (tasks not listed: zero-shot)"
        in EvalTable([zero, five]).to_markdown()
    )


@pytest.mark.parametrize("mode", [["--tasks", "shakespeare_speaker"], ["--text", "t.txt"]])
def test_out_that_is_a_file_is_refused_before_any_scoring(checkpoint, tmp_path, capsys, mode,
                                                         monkeypatch):  # fmt: skip
    """--out naming a file was found out after every task had run: '[Errno 17] File exists'."""
    from spikemar.eval import cli as eval_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("Hark!\n")
    (tmp_path / "taken").write_text("x")

    def no_scoring(*a, **k):
        raise AssertionError("scored before --out was checked")

    monkeypatch.setattr(eval_cli, "evaluate_checkpoints", no_scoring)
    monkeypatch.setattr(eval_cli, "_run_text", no_scoring)
    assert cli.main(["eval", "--checkpoint", str(checkpoint), *mode, "--out", "taken"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("spikemar eval: error: --out: cannot write in 'taken': 'taken' is a file, "
                   "not a folder")  # fmt: skip


def test_checkpoints_of_the_same_name_get_rows_told_apart():
    """runs/a/model.pt beside runs/b/model.pt: two rows both labelled 'model'."""
    import argparse
    from pathlib import Path

    from spikemar.eval.cli import _labels

    paths = [Path("runs/a/model.pt"), Path("runs/b/model.pt"), Path("teacher.pt")]
    assert _labels(argparse.Namespace(label=None), paths) == [
        "runs/a/model.pt", "runs/b/model.pt", "teacher"
    ]  # fmt: skip


def test_lm_evals_trust_remote_code_flag_is_taken(checkpoint):
    """lm_eval's ``--trust_remote_code`` puts ``trust_remote_code=True`` into every model's
    arguments (for the task data's loaders): spikemar refused it as an unknown argument."""
    from spikemar.eval.harness import SpikemarLM

    lm = SpikemarLM.create_from_arg_string(
        f"checkpoint={checkpoint},trust_remote_code=True", {"batch_size": 2, "device": "cpu"}
    )
    assert lm.scorer.batch_size == 2
    with pytest.raises(ValueError, match="trust_remote_code: expected true or false"):
        SpikemarLM.create_from_arg_string(f"checkpoint={checkpoint},trust_remote_code=maybe")


def test_lm_evals_results_carry_the_energy_of_the_scored_passes(checkpoint):
    """``python -m spikemar.eval run --model spikemar ... --output_path`` counted every pass
    (count_energy defaults to true) and then dropped the count: no energy in lm_eval's JSON."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from spikemar.eval import TASKS_DIR
    from spikemar.eval.harness import SpikemarLM
    from spikemar.eval.report import energy_summary

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    lm = SpikemarLM(checkpoint=checkpoint)
    results = lm_eval.simple_evaluate(model=lm, tasks=["shakespeare_speaker"], limit=1,
                                      task_manager=manager)  # fmt: skip
    energy = json.loads(json.dumps(results["config"]["spikemar_energy"]))
    assert energy == json.loads(json.dumps(energy_summary(lm.energy_report())))
    assert energy["energy_pj_per_token"]["45nm-fp32"] > 0 and energy["positions"] > 0
    plain = SpikemarLM(checkpoint=checkpoint, count_energy=False)
    assert "spikemar_energy" not in plain.get_model_info()


@pytest.mark.parametrize("spiking", [False, True])
def test_a_long_document_of_a_large_vocabulary_is_scored_chunk_by_chunk(spiking):
    """One forward pass held a document's logits whole (tokens × vocabulary: gigabytes for a
    wikitext document under a 128k BPE vocabulary); an SSM model's document longer than
    2^24 / vocabulary tokens is now scored by prefill chunks with the state carried. The
    scores, the positions and the energy are those of one pass."""
    import torch.nn.functional as F

    from spikemar.eval import Scorer

    vocab = 2**18  # chunks of 64 tokens
    spikes = SpikeConfig(T=4, tau=2.0, v_threshold=0.3) if spiking else None
    torch.manual_seed(0)
    model = MARLM(MARConfig(vocab_size=vocab, d_model=16, n_layers=2, d_state=4, head_dim=8,
                            spikes=spikes)).eval()  # fmt: skip
    doc = torch.randint(1, vocab, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    scorer = Scorer(model, vocab, count_energy=True)
    rows = []  # token positions of each logits tensor the head made
    hook = model.head.register_forward_hook(lambda m, i, out: rows.append(out[0].numel() // vocab))
    got = scorer.token_logprobs([doc], 0)[0]
    hook.remove()
    assert rows == [64, 64, 22]  # never the whole document's logits at once
    with torch.no_grad():
        logits = model(torch.tensor([[0, *doc[:-1]]]))
    want = F.log_softmax(logits[0].double(), -1).gather(-1, torch.tensor(doc)[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert scorer.positions == len(doc)
    one_pass = Scorer(model, vocab, count_energy=True)
    with torch.no_grad(), one_pass.counter:
        model(torch.tensor([[0, *doc[:-1]]]))
    one_pass.positions = len(doc)
    assert scorer.energy_report().per_token()["energy_pj"] == pytest.approx(
        one_pass.energy_report().per_token()["energy_pj"], rel=1e-9
    )
