"""`python -m dkn ...` as other tools call it: a subprocess, JSON on stdout, exit status 2 and one
line on stderr for bad arguments.  The real-model runs are few (each loads SmolLM2 in ~3-5 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import fact_argv, save_model_folder

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
PROMPT, ANSWER = "The capital of France is", "Paris"


def dkn(*args: str, offline: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "dkn", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _usage_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    line = lines[0]
    assert line.startswith(f"dkn {command}: error: "), line
    for needle in needles:
        assert needle in line, line
    return line


# -- the default model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attributed():
    proc = dkn(
        "attribute", "--prompt", PROMPT, "--answer", ANSWER, "--json", "--no-cache", "--steps", "4", "--top", "5"
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.real_model
def test_attribute_json(attributed):
    out = attributed
    documented = {"model", "prompt", "answer", "prob", "n_layers", "d_mlp", "top", "seconds", "cached"}
    assert documented <= set(out)
    assert set(out) - documented <= {"answer_tokens", "params", "intervals"}
    assert out["params"]["rule"] == "adaptive" and out["intervals"][0][0] > out["params"]["steps"]  # layer 0 refined
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
    proc = dkn(
        "neurons",
        "--fact-prompts",
        PROMPT,
        "Paris is the capital of France. The capital of France is",
        "--answer",
        ANSWER,
        "--json",
        "--no-cache",
        "--steps",
        "2",
        "--p",
        "0.4",
    )
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
    for argv, needle in [
        (["attribute", "--prompt", "", "--answer", ANSWER, "--no-cache"], "prompt is empty"),
        (["attribute", "--prompt", PROMPT, "--answer", " ", "--no-cache"], "answer is empty"),
        (["intervene", "--prompt", " ", "--answer", ANSWER, "--suppress", "1:2"], "prompt is empty"),
        (["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--amplify", "0:1536"], "out of range"),
    ]:
        _in_process_error(capsys, argv, needle)
    _in_process_error(
        capsys,
        ["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "3:7,30:1"],
        "30:1",
        "out of range",
        "layers 0..29",
        "neurons 0..1535",
    )


# -- bad arguments that never load the default model ------------------------------------------------------
def _in_process_error(capsys, argv, *needles) -> str:
    from dkn.cli import main

    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return _usage_error(subprocess.CompletedProcess(argv, status, out, err), argv[0], *needles)


def test_unknown_model_exits_2():
    _usage_error(
        dkn(
            "attribute",
            "--model",
            "no-such-owner/no-such-model-dkn-test",
            "--prompt",
            PROMPT,
            "--answer",
            ANSWER,
            "--no-cache",
        ),
        "attribute",
        "unknown model",
    )


def test_intervene_argument_errors_exit_2(capsys):
    _in_process_error(capsys, ["intervene", "--prompt", PROMPT, "--answer", ANSWER], "--suppress")
    _in_process_error(
        capsys,
        ["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "12-345"],
        "cannot read neuron",
        "LAYER:INDEX",
    )
    _in_process_error(
        capsys,
        ["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "1:2", "--amplify", "3:4"],
        "not both",
    )


def test_argparse_errors_exit_2(capsys):
    from dkn.cli import main

    for argv, needle in [
        (["attribute", "--prompt", PROMPT], "--answer"),
        (["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "1:2", "--mode", "sideways"], "--mode"),
        (["explode"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert needle in capsys.readouterr().err


def test_file_instead_of_folder_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    _in_process_error(
        capsys, ["attribute", "--model", str(file), "--prompt", PROMPT, "--answer", ANSWER, "--no-cache"], "is a file"
    )


def test_folder_without_model_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _in_process_error(
        capsys, ["attribute", "--model", str(tmp_path), "--prompt", PROMPT, "--answer", ANSWER, "--no-cache"]
    )


def _tiny_folder(tmp_path) -> Path:
    from tiny_models import tiny_model

    return save_model_folder(tiny_model("gpt2"), tmp_path / "tiny")


def test_tiny_local_folder_through_every_command(tmp_path, capsys):
    """A local safetensors folder through the commands, in process (no default model)."""
    from dkn.cli import main

    model = ["--model", str(_tiny_folder(tmp_path)), "--device", "cpu"]
    fact = ["--prompt", "the capital of france is", "--answer", "paris"]
    capsys.readouterr()
    assert main(["attribute", *model, *fact, "--json", "--no-cache", "--steps", "2", "--top", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["n_layers"], out["d_mlp"], len(out["top"])) == (3, 128, 4)
    assert out["answer"] == " paris" and 0 < out["prob"] < 1 and out["cached"] is False
    top = ",".join(f"{r['layer']}:{r['neuron']}" for r in out["top"])
    assert main(["intervene", *model, *fact, "--amplify", top, "--factor", "3", "--mode", "all", "--json"]) == 0
    inter = json.loads(capsys.readouterr().out)
    assert inter["prob_before"] == pytest.approx(out["prob"], rel=1e-5)
    assert inter["factor"] == 3.0 and inter["mode"] == "all" and inter["prob_after"] != inter["prob_before"]
    assert (
        main(
            [
                "neurons",
                *model,
                "--fact-prompts",
                "the capital of france is",
                "a city of france is",
                "--answer",
                "paris",
                "--json",
                "--no-cache",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    records = json.loads(capsys.readouterr().out)["knowledge_neurons"]
    assert all({"layer", "neuron", "score"} <= set(r) for r in records)
    _in_process_error(capsys, ["intervene", *model, *fact, "--suppress", "3:0"], "out of range", "layers 0..2")


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors"])
def test_unreadable_model_folder_exits_2(tmp_path, capsys, damage):
    folder = _tiny_folder(tmp_path)
    (folder / damage).write_bytes(b"{ this is not what it should be" * 4)
    _in_process_error(capsys, fact_argv("attribute", folder, "the capital of france is", "paris", "--no-cache"))


# -- bad numbers, names and paths are refused before anything loads ---------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--amplify", "1:2", "--factor", "nan"], "finite"),
        (["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--amplify", "1:2", "--factor", "inf"], "finite"),
        (["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "1:2", "--factor=-inf"], "finite"),
        (["intervene", "--prompt", PROMPT, "--answer", ANSWER, "--suppress", "1:2", "--top-k", "-1"], "at least 1"),
        (["attribute", "--prompt", PROMPT, "--answer", ANSWER, "--top", "-5"], "at least 1"),
        (["attribute", "--prompt", PROMPT, "--answer", ANSWER, "--top", "five"], "not a whole number"),
        (["attribute", "--prompt", PROMPT, "--answer", ANSWER, "--steps", "0"], "at least 1"),
        (["attribute", "--prompt", PROMPT, "--answer", ANSWER, "--steps", "5"], "even --steps"),
        (["attribute", "--prompt", PROMPT, "--answer", ANSWER, "--rule", "simpson"], "invalid choice"),
        (["experiment", "acquisition", "--limit", "0"], "at least 1"),
        (["experiment", "acquisition", "--limit", "-1"], "at least 1"),
        (["experiment", "no_such_experiment"], "invalid choice"),
        (["neurons", "--fact-prompts", PROMPT, "--answer", ANSWER, "--t", "1.5"], "between 0 and 1"),
        (["dkn", "--prompt", PROMPT, "--answer", ANSWER, "--clusterer", "spectral"], "invalid choice"),
    ],
)
def test_bad_numbers_and_names_are_refused(argv, needle, capsys, monkeypatch):
    import dkn.models
    from dkn.cli import main

    monkeypatch.setattr(dkn.models, "load_model", _no_model)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded here")


def test_missing_local_folder_says_no_such_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (str(tmp_path / "nope"), "./no-such-model-folder", "~/no/such/folder"):
        line = _in_process_error(
            capsys,
            ["attribute", "--model", name, "--prompt", PROMPT, "--answer", ANSWER, "--no-cache"],
            "no such folder",
        )
        assert "Hugging Face Hub" not in line


def test_dataset_errors_come_before_the_model_loads(capsys, monkeypatch):
    import dkn.models

    monkeypatch.setattr(dkn.models, "load_model", _no_model)
    _in_process_error(capsys, ["experiment", "acquisition", "--dataset", "no_such_dataset"], "unknown dataset")
    _in_process_error(
        capsys, ["experiment", "acquisition", "--dataset", "builtin:no_such_relation"], "no built-in relation"
    )


def test_option_lists_match_the_library():
    """The CLI's choices come from dkn.options; the modules that implement them must agree."""
    from dkn import attribution, degeneracy, integration, interventions, options
    from dkn.experiments.runner import EXPERIMENTS

    assert options.METHODS == attribution.METHODS
    assert options.BASELINES == attribution.BASELINES
    assert options.RULES == integration.RULES
    assert options.MODES == interventions.MODES
    assert options.CLUSTERERS == degeneracy.CLUSTERER_NAMES
    assert options.EXPERIMENTS == tuple(EXPERIMENTS)


def test_only_project_errors_are_user_errors(monkeypatch, capsys):
    """A RuntimeError from a bug keeps its traceback; a user error gets one line, and a traceback under -v."""
    from dkn import cli

    def buggy(args):
        raise RuntimeError("a bug")

    def user_error(args):
        raise cli.UsageError("say what to do")

    parser = cli._parser
    monkeypatch.setattr(cli, "_parser", lambda: _with_run(parser(), buggy))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["attribute", "--prompt", PROMPT, "--answer", ANSWER])
    monkeypatch.setattr(cli, "_parser", lambda: _with_run(parser(), user_error))
    assert cli.main(["attribute", "--prompt", PROMPT, "--answer", ANSWER]) == 2
    assert capsys.readouterr().err == "dkn attribute: error: say what to do\n"
    assert cli.main(["attribute", "-v", "--prompt", PROMPT, "--answer", ANSWER]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError: say what to do" in err


def _with_run(parser, run):
    parser.set_defaults(run=run)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(run=run)
    return parser


def test_streamlit_binds_to_localhost():
    """What Streamlit itself reads from .streamlit/config.toml for a plain `streamlit run app.py`."""
    code = (
        "from streamlit import config; config.get_config_options(force_reparse=True); "
        "print(config.get_option('server.address'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "localhost"


# -- the tiny local model: answers, neurons, and cached answers without the model ------------------------
TINY_FACT = ["--prompt", "the capital of france is", "--answer", "paris"]


def test_answer_trailing_newline_is_stripped_and_neurons_listed_once(tmp_path, capsys):
    from dkn.cli import main

    model = ["--model", str(_tiny_folder(tmp_path)), "--device", "cpu"]
    capsys.readouterr()
    assert main(["attribute", *model, *TINY_FACT, "--json", "--no-cache", "--steps", "2", "--top", "3"]) == 0
    plain = json.loads(capsys.readouterr().out)
    newline = ["--prompt", TINY_FACT[1], "--answer", "paris\n"]
    assert main(["attribute", *model, *newline, "--json", "--no-cache", "--steps", "2", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == " paris" and out["answer_tokens"] == plain["answer_tokens"]
    assert out["prob"] == pytest.approx(plain["prob"])
    assert main(["intervene", *model, *TINY_FACT, "--suppress", "0:1,0:1,1:5,0:1", "--json"]) == 0
    inter = json.loads(capsys.readouterr().out)
    assert inter["neurons"] == ["0:1", "1:5"]


def test_cached_attribute_answers_without_loading_the_model(tmp_path, capsys, monkeypatch):
    import dkn.models
    from dkn.cli import main

    monkeypatch.setenv("DKN_CACHE_DIR", str(tmp_path / "cache"))
    folder = _tiny_folder(tmp_path)
    argv = ["attribute", "--model", str(folder), "--device", "cpu", *TINY_FACT, "--json", "--steps", "2", "--top", "4"]
    capsys.readouterr()
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cached"] is False
    assert first["params"]["rule"] == "adaptive" and first["params"]["steps"] == 2
    assert len(first["intervals"]) == 1 and len(first["intervals"][0]) == first["n_layers"]  # one answer token
    assert all(n >= 2 and n % 2 == 0 for n in first["intervals"][0])
    monkeypatch.setattr(dkn.models, "load_model", _no_model)
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] is True
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
    assert main([*argv[:-2], "--top", "2"]) == 0  # --top is not part of the result
    assert json.loads(capsys.readouterr().out)["top"] == first["top"][:2]
    # a changed weight file, or another request, is a miss: it needs the model again
    config = folder / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="must not be loaded"):
        main(argv)
    with pytest.raises(AssertionError, match="must not be loaded"):
        main([*argv[:-4], "--steps", "4", "--top", "4"])


_NO_TORCH_CHILD = """
import json, sys
from dkn.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def test_cached_attribute_does_not_import_torch(tmp_path):
    """The second, cached call in a fresh process never imports torch (that is what made it take seconds)."""
    folder = _tiny_folder(tmp_path)
    env = dict(os.environ, DKN_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    argv = ["attribute", "--model", str(folder), "--device", "cpu", *TINY_FACT, "--json", "--steps", "2"]
    runs = [
        subprocess.run(
            [sys.executable, "-c", _NO_TORCH_CHILD, *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        for _ in range(2)
    ]
    reports = [json.loads(r.stderr.strip().splitlines()[-1]) for r in runs]
    assert reports == [{"status": 0, "torch": True}, {"status": 0, "torch": False}], [r.stderr for r in runs]
    first, second = (json.loads(r.stdout) for r in runs)
    assert second["cached"] is True and second["top"] == first["top"] and second["prob"] == first["prob"]
