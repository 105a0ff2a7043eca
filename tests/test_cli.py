"""`python -m dkn ...` as other tools call it: a subprocess, JSON on stdout, exit status 2 and one
line on stderr for bad arguments.  The real-model runs are few (each loads SmolLM2 in ~3-5 s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
PROMPT, ANSWER = "The capital of France is", "Paris"


def dkn(*args: str, offline: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "dkn", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _usage_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr            # one line, no traceback
    line = lines[0]
    assert line.startswith(f"dkn {command}: error: "), line
    for needle in needles:
        assert needle in line, line
    return line


# -- the default model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attributed():
    proc = dkn("attribute", "--prompt", PROMPT, "--answer", ANSWER, "--json", "--no-cache", "--steps", "4",
               "--top", "5")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.real_model
def test_attribute_json(attributed):
    out = attributed
    documented = {"model", "prompt", "answer", "prob", "n_layers", "d_mlp", "top", "seconds", "cached"}
    assert documented <= set(out)
    assert set(out) - documented <= {"answer_tokens"}
    assert out["model"] == "default" and out["prompt"] == PROMPT and out["answer"] == " Paris"
    assert 0.6 < out["prob"] < 0.9
    assert (out["n_layers"], out["d_mlp"]) == (30, 1536)
    assert out["cached"] is False and out["seconds"] > 0
    assert len(out["top"]) == 5
    for row in out["top"]:
        assert set(row) == {"layer", "neuron", "score"}
        assert 0 <= row["layer"] < 30 and 0 <= row["neuron"] < 1536
    scores = [row["score"] for row in out["top"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0


@pytest.mark.real_model
def test_intervene_json(attributed):
    top = ",".join(f"{row['layer']}:{row['neuron']}" for row in attributed["top"])
    proc = dkn("intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", top, "--json", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"prob_before", "prob_after", "relative_change", "top_before", "top_after"} <= set(out)
    assert out["prob_before"] == pytest.approx(attributed["prob"], rel=1e-4)
    assert out["prob_after"] < out["prob_before"]
    assert out["relative_change"] == pytest.approx((out["prob_after"] - out["prob_before"]) / out["prob_before"])
    assert len(out["top_before"]) == len(out["top_after"]) == 3
    assert out["top_before"][0][0] == " Paris" and out["top_before"][0][1] == pytest.approx(out["prob_before"])
    assert all(isinstance(t, str) and 0 <= p <= 1 for t, p in out["top_before"] + out["top_after"])
    assert out["factor"] == 0.0 and out["mode"] == "last" and out["neurons"] == top.split(",")


@pytest.mark.real_model
def test_neurons_json():
    proc = dkn("neurons", "--fact-prompts", PROMPT, "Paris is the capital of France. The capital of France is",
               "--answer", ANSWER, "--json", "--no-cache", "--steps", "1", "--p", "0.4")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    records = out["knowledge_neurons"]
    assert isinstance(records, list) and records
    for row in records:
        assert {"layer", "neuron", "score"} <= set(row)
        assert 0 <= row["layer"] < 30 and 0 <= row["neuron"] < 1536
    scores = [row["score"] for row in records]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.real_model
def test_bad_prompt_or_neuron_exits_2(default_lm, monkeypatch, capsys):
    """In process (dkn.cli.main, loader patched to the session's model): more subprocesses would only
    load the same model again (the exit status of a real process is checked by test_unknown_model_exits_2)."""
    import dkn.models

    monkeypatch.setattr(dkn.models, "load_model", lambda *a, **k: default_lm)
    for argv, needle in [(["attribute", "--prompt", "", "--answer", ANSWER, "--no-cache"], "prompt is empty"),
                         (["attribute", "--prompt", PROMPT, "--answer", " ", "--no-cache"], "answer is empty"),
                         (["intervene", "--prompt", " ", "--answer", ANSWER, "--suppress", "1:2"], "prompt is empty"),
                         (["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--amplify", "0:1536"], "out of range")]:
        _in_process_error(capsys, argv, needle)
    _in_process_error(capsys, ["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "3:7,30:1"],
                      "30:1", "out of range", "layers 0..29", "neurons 0..1535")


# -- bad arguments that never load the default model ------------------------------------------------------
def _in_process_error(capsys, argv, *needles) -> str:
    from dkn.cli import main

    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return _usage_error(subprocess.CompletedProcess(argv, status, out, err), argv[0], *needles)


def test_unknown_model_exits_2():
    _usage_error(dkn("attribute", "--model", "no-such-owner/no-such-model-dkn-test", "--prompt", PROMPT,
                     "--answer", ANSWER, "--no-cache"), "attribute", "unknown model")


def test_intervene_argument_errors_exit_2(capsys):
    _in_process_error(capsys, ["intervene", "--prompt", PROMPT, "--answer", ANSWER], "--suppress")
    _in_process_error(capsys, ["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "12-345"],
                      "cannot read neuron", "LAYER:INDEX")
    _in_process_error(capsys, ["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "1:2",
                               "--amplify", "3:4"], "not both")


def test_argparse_errors_exit_2(capsys):
    from dkn.cli import main

    for argv, needle in [(["attribute", "--prompt", PROMPT], "--answer"),
                         (["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "1:2", "--mode",
                           "sideways"], "--mode"),
                         (["explode"], "invalid choice")]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert needle in capsys.readouterr().err


def test_file_instead_of_folder_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    _in_process_error(capsys, ["attribute", "--model", str(file), "--prompt", PROMPT, "--answer", ANSWER,
                               "--no-cache"], "is a file")


def test_folder_without_model_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _in_process_error(capsys, ["attribute", "--model", str(tmp_path), "--prompt", PROMPT, "--answer", ANSWER,
                               "--no-cache"])


def _tiny_folder(tmp_path) -> Path:
    from tiny_models import tiny_model

    lm = tiny_model("gpt2")
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)
    return folder


def test_tiny_local_folder_through_every_command(tmp_path, capsys):
    """A local safetensors folder through the commands, in process (no default model)."""
    from dkn.cli import main

    model = ["--model", str(_tiny_folder(tmp_path)), "--device", "cpu"]
    fact = ["--prompt", "the capital of france is", "--answer", "paris"]
    capsys.readouterr()
    assert main(["attribute", *model, *fact, "--json", "--no-cache", "--steps", "3", "--top", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["n_layers"], out["d_mlp"], len(out["top"])) == (3, 128, 4)
    assert out["answer"] == " paris" and 0 < out["prob"] < 1 and out["cached"] is False
    top = ",".join(f"{r['layer']}:{r['neuron']}" for r in out["top"])
    assert main(["intervene", *model, *fact, "--amplify", top, "--factor", "3", "--mode", "all", "--json"]) == 0
    inter = json.loads(capsys.readouterr().out)
    assert inter["prob_before"] == pytest.approx(out["prob"], rel=1e-5)
    assert inter["factor"] == 3.0 and inter["mode"] == "all" and inter["prob_after"] != inter["prob_before"]
    assert main(["neurons", *model, "--fact-prompts", "the capital of france is", "a city of france is",
                 "--answer", "paris", "--json", "--no-cache", "--steps", "2"]) == 0
    records = json.loads(capsys.readouterr().out)["knowledge_neurons"]
    assert all({"layer", "neuron", "score"} <= set(r) for r in records)
    _in_process_error(capsys, ["intervene", *model, *fact, "--suppress", "3:0"], "out of range", "layers 0..2")


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors"])
def test_unreadable_model_folder_exits_2(tmp_path, capsys, damage):
    folder = _tiny_folder(tmp_path)
    (folder / damage).write_bytes(b"{ this is not what it should be" * 4)
    _in_process_error(capsys, ["attribute", "--model", str(folder), "--device", "cpu", "--prompt",
                               "the capital of france is", "--answer", "paris", "--no-cache"])
