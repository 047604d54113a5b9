"""What ``spikemar eval`` and ``--model spikemar`` can be pointed at, and how they end.

A Hugging Face Mamba-2 directory (made here: a random transformers ``Mamba2ForCausalLM`` and a
BPE trained here) and a spikemar checkpoint carrying a BPE tokenizer score as direct
computations from the logits say (transformers' own logits for the directory); lm_eval's command
line with spikemar registered (``python -m spikemar.eval``, and the ``spikemar-lm-eval`` script
where the installed package declares it) runs a local task; the standard tasks without a network
end in one line saying so; SIGTERM stops a running ``spikemar eval`` with exit 143, one line and
nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the 'eval' extra) is missing")
transformers = pytest.importorskip("transformers")

from references.hf_checkpoints import (  # noqa: E402
    begin_of_text_tokenizer,
    bpe_tokenizer,
    write_mamba2_checkpoint,
)

from spikemar.checkpoint import save_checkpoint  # noqa: E402
from spikemar.eval import harness  # noqa: E402
from spikemar.models import MARLM, MARConfig, SpikeConfig  # noqa: E402
from spikemar.tokenizer import HFTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
# contexts and continuations whose BPE tokens split where the strings do (checked below), so
# that the direct computation can encode the two halves on their own
REQUESTS = [("First Citizen:\nBefore we", " proceed"), ("hear me", " speak."), ("Before", " we")]


def instances(request_type: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type=request_type, doc={}, arguments=a, idx=i) for i, a in enumerate(args)
    ]


def direct(logits_of, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) in float64 and whether it is the greedy choice, from the
    logits of one forward pass over context + continuation."""
    ctx, cont = tok.encode(context), tok.encode(continuation)
    assert tok.encode(context + continuation) == ctx + cont  # the split is the tokenizer's
    logits = logits_of(torch.tensor([ctx + cont]))[0].double()
    logp = logits.log_softmax(-1)[len(ctx) - 1 : -1]
    target = torch.tensor(cont)
    chosen = logp.gather(-1, target[:, None])[:, 0]
    return float(chosen.sum()), bool((logp.argmax(-1) == target).all())


@pytest.fixture(scope="module")
def mamba2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mamba2")
    hf = write_mamba2_checkpoint(path)
    return path, hf


def test_hugging_face_directory_scores_as_transformers_logits(mamba2_dir):
    path, hf = mamba2_dir
    lm = harness.SpikemarLM.create_from_arg_string(f"checkpoint={path},count_energy=False")
    assert lm.tokenizer == HFTokenizer.from_directory(path)  # the directory's BPE
    got = lm.loglikelihood(instances("loglikelihood", REQUESTS))
    with torch.no_grad():
        for (ctx, cont), (logprob, greedy) in zip(REQUESTS, got, strict=True):
            want = direct(lambda x: hf(x).logits, lm.tokenizer, ctx, cont)
            assert logprob == pytest.approx(want[0], rel=1e-4)
            assert greedy == want[1]
        doc = "First Citizen:\nBefore we proceed any further, hear me speak."
        ids = [lm.tokenizer.eos_id, *lm.tokenizer.encode(doc)]  # from end-of-text
        logp = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        want = float(logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    (rolling,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(doc,)]))
    assert rolling == pytest.approx(want, rel=1e-4)


def test_a_tokenizer_that_begins_texts_with_a_token_scores_as_lm_evals_hf_model(tmp_path):
    """lm_eval's ``hf`` model (add_bos_token unset: the tokenizer's own behaviour) encodes each
    context with the tokenizer's ``<|begin_of_text|>`` first and takes that token as the prefix
    of empty contexts and rolling documents. spikemar did neither (no BOS, and the end-of-text
    token as prefix), so a Llamba scored worse than lm_eval scores it. Direct computation from
    transformers' logits, as the ``hf`` model would run them."""
    hf = write_mamba2_checkpoint(tmp_path, vocab_size=304, tokenizer=False)
    tok = begin_of_text_tokenizer()
    tok.save(tmp_path)
    lm = harness.SpikemarLM(checkpoint=tmp_path, count_energy=False, batch_size=2)
    bos = 300
    assert lm.prefix_token_id == bos and lm.eot_token_id == 0
    assert lm.tok_encode("hear me") == [bos, *tok.encode("hear me")]
    assert lm.tok_encode("hear me", add_special_tokens=False) == tok.encode("hear me")
    assert lm.tok_encode("<|begin_of_text|>hear") == tok.encode("<|begin_of_text|>hear")

    def logp_of(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)

    requests = [*REQUESTS, ("", "hear me")]
    got = lm.loglikelihood(instances("loglikelihood", requests))
    for (ctx, cont), (logprob, _) in zip(requests, got, strict=True):
        ctx_ids = [bos, *tok.encode(ctx)]  # the hf model's context: BOS first
        ids = ctx_ids + tok.encode(cont)
        logp = logp_of(ids)[len(ctx_ids) - 1 : -1]
        want = float(logp.gather(-1, torch.tensor(ids[len(ctx_ids) :])[:, None]).sum())
        assert logprob == pytest.approx(want, rel=1e-4), (ctx, cont)
    doc = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = [bos, *tok.encode(doc)]  # the document after its one prefix
    want = float(logp_of(ids)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    (rolling,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(doc,)]))
    assert rolling == pytest.approx(want, rel=1e-4)
    from spikemar.eval import text_perplexity

    result = text_perplexity(lm.scorer.model, tok, doc)
    assert result.nats_per_token * result.tokens == pytest.approx(-want, rel=1e-4)


def test_checkpoint_with_a_bpe_tokenizer(tmp_path):
    tok = bpe_tokenizer(300)
    torch.manual_seed(3)
    config = MARConfig(vocab_size=300, d_model=16, n_layers=1, d_state=8, head_dim=8,
                       spikes=SpikeConfig(T=2, v_threshold=0.05))  # fmt: skip
    model = MARLM(config).eval()
    path = save_checkpoint(tmp_path / "bpe.pt", model, tok)
    lm = harness.SpikemarLM(checkpoint=path, count_energy=False)
    assert lm.tokenizer == tok
    got = lm.loglikelihood(instances("loglikelihood", REQUESTS))
    with torch.no_grad():
        for (ctx, cont), (logprob, greedy) in zip(REQUESTS, got, strict=True):
            want = direct(model, tok, ctx, cont)
            assert logprob == pytest.approx(want[0], rel=1e-5)
            assert greedy == want[1]


def test_eval_command_scores_a_hugging_face_directory_on_a_local_task(mamba2_dir, tmp_path):
    from spikemar import cli

    path, _ = mamba2_dir
    out = tmp_path / "out"
    tasks = "shakespeare_nextline,shakespeare_rolling"
    argv = ["eval", "--checkpoint", str(path), "--label", "mamba2", "--tasks", tasks,
            "--limit", "2", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    (row,) = json.loads((out / "eval.json").read_text())["rows"]
    assert row["samples"] == {"shakespeare_nextline": 2, "shakespeare_rolling": 2}
    assert 0 <= row["tasks"]["shakespeare_nextline"]["acc"] <= 1
    assert row["tasks"]["shakespeare_rolling"]["bits_per_byte"] > 0


def test_a_checkpoint_without_a_tokenizer_is_scored_with_one_from_elsewhere(tmp_path, capsys):
    """state-spaces/mamba2-130m ships no tokenizer: tokenizer= (model_args) and --tokenizer
    name one; the scores are those of the same model with that tokenizer in its directory."""
    from spikemar import cli

    write_mamba2_checkpoint(tmp_path / "bare", tokenizer=False)
    tok = bpe_tokenizer(300)
    tok.save(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        harness.SpikemarLM(checkpoint=tmp_path / "bare")
    (tmp_path / "t.txt").write_text("to be or not to be\n")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "bare"), "--text",
                     str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--checkpoint: " in err and "pass --tokenizer DIR|FILE|OWNER/NAME" in err
    assert "tokenizer=False" not in err
    lm = harness.SpikemarLM(checkpoint=tmp_path / "bare", tokenizer=str(tmp_path / "tok"),
                            count_energy=False)  # fmt: skip
    assert lm.tokenizer == tok
    write_mamba2_checkpoint(tmp_path / "whole")  # the same weights (seed 0) with the tokenizer
    whole = harness.SpikemarLM(checkpoint=tmp_path / "whole", count_energy=False)
    got = lm.loglikelihood(instances("loglikelihood", REQUESTS))
    want = whole.loglikelihood(instances("loglikelihood", REQUESTS))
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-9)
    (tmp_path / "text.txt").write_text("to be or not to be, that is the question\n" * 5)
    argv = ["eval", "--checkpoint", str(tmp_path / "bare"), "--tokenizer", str(tmp_path / "tok"),
            "--text", str(tmp_path / "text.txt"), "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 0 and "nats/token" in capsys.readouterr().out
    argv[4] = str(tmp_path / "nowhere")
    assert cli.main(argv) == 2
    assert "--tokenizer: no directory at" in capsys.readouterr().err


def test_a_model_vocabulary_smaller_than_its_tokenizer_is_refused(tmp_path):
    model = MARLM(MARConfig(vocab_size=50, d_model=16, n_layers=1, d_state=8, head_dim=8))
    path = save_checkpoint(tmp_path / "small.pt", model, bpe_tokenizer(300))
    with pytest.raises(ValueError, match=r"vocabulary \(50\) is smaller than its tokenizer's"):
        harness.SpikemarLM(checkpoint=path)


# -- lm_eval's command line with spikemar registered ---------------------------------------------


def _run(argv: list[str], timeout: float = 1200, **env_vars: str) -> subprocess.CompletedProcess:
    # the timeout only guards against a hang: lm_eval's command indexes ~15,000 task configs
    # first, ~20 s on a quiet machine and minutes on an oversubscribed one
    env = {**os.environ, **OFFLINE, **env_vars}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _lm_eval_args(checkpoint: Path, out: Path) -> list[str]:
    return ["run", "--model", "spikemar", "--model_args", f"checkpoint={checkpoint}",
            "--tasks", "shakespeare_speaker", "--include_path", "spikemar/eval/tasks",
            "--limit", "2", "--output_path", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_char_checkpoint(tmp_path_factory):
    from spikemar.data import CharTokenizer

    chars = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    torch.manual_seed(5)
    model = MARLM(MARConfig(vocab_size=len(chars), d_model=16, n_layers=1, d_state=8,
                            head_dim=8, spikes=SpikeConfig(T=2)))  # fmt: skip
    return save_checkpoint(tmp_path_factory.mktemp("c") / "tiny.pt", model, CharTokenizer(chars))


def _assert_lm_eval_ran(result: subprocess.CompletedProcess, out: Path) -> None:
    assert result.returncode == 0, result.stderr[-2000:]
    (results,) = out.rglob("results_*.json")
    data = json.loads(results.read_text())
    assert 0 <= data["results"]["shakespeare_speaker"]["acc,none"] <= 1
    assert data["config"]["model"] == "spikemar"


def _declared(group: str, name: str):
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    return found[0] if found else None


def test_lm_evals_command_with_spikemar_runs_a_local_task(tiny_char_checkpoint, tmp_path):
    """``spikemar-lm-eval`` where the installed package declares the script, else
    ``python -m spikemar.eval`` (the same function); one run, as lm_eval's command indexes all
    of its ~15,000 task configs first (tens of seconds)."""
    script = _declared("console_scripts", "spikemar-lm-eval")
    if script is not None:
        assert script.value == "spikemar.eval.__main__:main"
        launcher = [str(Path(sys.executable).with_name("spikemar-lm-eval"))]
    else:
        launcher = [sys.executable, "-m", "spikemar.eval"]
    out = tmp_path / "lm_eval"
    _assert_lm_eval_ran(_run([*launcher, *_lm_eval_args(tiny_char_checkpoint, out)]), out)


def test_importing_spikemar_eval_names_the_model_in_lm_evals_registry():
    """``import spikemar.eval`` and then ``lm_eval.simple_evaluate(model="spikemar")``: lm_eval
    found no model of that name unless spikemar.eval.harness itself had been imported. The
    entry is lazy (the class is imported when lm_eval asks for it), into lm_eval's registry on
    import, and into a fresh one here."""
    from lm_eval.api.registry import Registry, model_registry

    import spikemar.eval

    assert "spikemar" in model_registry
    fresh = Registry("model")
    assert spikemar.eval.register_with_lm_eval(fresh) is True
    assert fresh.get("spikemar") is harness.SpikemarLM
    assert spikemar.eval.register_with_lm_eval(fresh) is False  # once


def test_lm_evals_command_finds_spikemars_local_tasks_without_include_path():
    """``python -m spikemar.eval run ... --tasks shakespeare_speaker`` said "Tasks not found"
    unless the user found the installed task folder for ``--include_path``; it is the default
    now, and a user's own ``--include_path`` is left as given."""
    from spikemar.eval import TASKS_DIR
    from spikemar.eval.__main__ import with_local_tasks

    argv = ["spikemar-lm-eval", "run", "--model", "spikemar", "--tasks", "shakespeare_speaker"]
    assert with_local_tasks(argv) == [*argv, "--include_path", str(TASKS_DIR)]
    legacy = ["lm_eval", "--model", "spikemar", "--tasks", "shakespeare_speaker"]
    assert with_local_tasks(legacy)[-2:] == ["--include_path", str(TASKS_DIR)]
    for own in ([*argv, "--include_path", "mine"], [*argv, "--include_path=mine"]):
        assert with_local_tasks(own) == own
    assert with_local_tasks(["lm_eval", "-h"]) == ["lm_eval", "-h"]
    assert with_local_tasks(["lm_eval"]) == ["lm_eval"]


def test_lm_eval_models_entry_point_names_the_model():
    """For lm_eval versions that discover models by the ``lm_eval.models`` entry point group
    (0.4.13 reads none): where spikemar declares one, it loads the registered class."""
    ep = _declared("lm_eval.models", "spikemar")
    if ep is None:
        pytest.skip("the installed spikemar declares no lm_eval.models entry point")
    assert ep.load() is harness.SpikemarLM


# -- ending: no network, SIGTERM ---------------------------------------------------------------


def test_standard_task_without_network_is_one_line(tiny_char_checkpoint, tmp_path):
    argv = [sys.executable, "-m", "spikemar", "eval", "--checkpoint", str(tiny_char_checkpoint),
            "--tasks", "piqa", "--unk", " ", "--limit", "1",
            "--out", str(tmp_path / "o")]  # fmt: skip
    # an empty Hugging Face cache: PIQA cannot come from an earlier download either
    hf_home = tmp_path / "hf"
    result = _run(argv, HF_HOME=str(hf_home), HF_DATASETS_CACHE=str(hf_home / "datasets"))
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith("spikemar eval: error: --tasks: the data of piqa is unreachable")
    assert "HF_DATASETS_OFFLINE" in errors[0] and "--include-path" in errors[0]
    assert not (tmp_path / "o").exists()


def test_sigterm_stops_a_running_eval_with_143_and_writes_nothing(tmp_path):
    """The packaged student on all of a local task takes far longer than the signal needs to
    arrive: it is sent once the command says it is scoring."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "spikemar", "eval", "--tasks", "shakespeare_nextline",
            "--out", str(out)]  # fmt: skip
    env = {**os.environ, **OFFLINE}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("spikemar eval: scoring"):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lines and lines[-1].startswith("spikemar eval: scoring"), "".join(lines)[-2000:]
    assert proc.returncode == 143, rest[-2000:]
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == "spikemar eval: stopped by SIGTERM; no results written"
    assert not out.exists() or not any(out.iterdir())


def test_hub_id_without_network_is_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Now is the winter of our discontent.\n")
    argv = [sys.executable, "-m", "spikemar", "eval", "--checkpoint", "nobody/no-such-model",
            "--text", str(text), "--out", str(tmp_path / "o")]  # fmt: skip
    hf_home = tmp_path / "hf"
    result = _run(argv, HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("spikemar eval: error: --checkpoint: 'nobody/no-such-model'")
    assert "HF_HUB_OFFLINE is set" in line
    assert not (tmp_path / "o").exists()
