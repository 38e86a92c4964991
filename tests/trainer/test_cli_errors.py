"""``python -m trainer``'s answers to a user's mistakes: one ``error:`` line and exit status 2,
never a traceback (a spec that is not a JSON object, an unknown key, an --output that is a file, a
path that is no LoRA checkpoint, a prompt of zero tokens); Ctrl-C is one line and 130;
``--overwrite`` keeps the earlier run until the new one trains; a torn last line of
metrics.jsonl does not stop a resume."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.factories import A_SHARE, letter_dataset
from trainer.__main__ import main
from trainer.errors import DatasetError, TrainingError
from trainer.metrics_file import MetricsFile


def spec_for(model_dir: Path, dataset: Path, **hyperparameters) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": str(dataset),
        "group_size": 2,
        "reward": A_SHARE,
        "hyperparameters": {
            "max_steps": 1,
            "prompts_per_step": 2,
            "max_completion_length": 4,
            "beta": 0.0,
            "checkpoint_every": 1,
            **hyperparameters,
        },
    }


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


def one_error_line(capsys) -> str:
    """The ``error:`` line the command ended with on stderr, checked to be its only one, with no
    traceback (before it, transformers may have drawn its progress bar loading the model)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [line for line in lines if line.startswith("error: ")] == lines[-1:], (
        err
    )
    return lines[-1]


# --- the spec file -------------------------------------------------------------------------------

YAML_SPEC = "base_model: m\ndataset: d.jsonl\nreward:\n  - type: exact_match\nhyperparameters:\n  lr: 1e-4\n"


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("spec.yaml", YAML_SPEC, "reads a JSON spec, and this is not JSON"),
        ("spec.json", YAML_SPEC, "from grpo_client.cli import read_spec"),  # YAML in a .json file
        ("spec.json", '{"base_model": "m",\n "dataset": "d.jsonl",}', "not valid JSON: Expecting property"),
        ("spec.json", '[{"base_model": "m"}]', 'a spec is a JSON object ({"base_model": ...'),
        ("spec.json", '"m"', "this is a string"),
        ("spec.json", None, "no such spec file"),
        ("spec.json", {"hyperparamters": {"max_steps": 5}}, "did you mean 'hyperparameters'?"),
        ("spec.json", {"eval_datset": "e.jsonl"}, "did you mean 'eval_dataset'?"),
        ("spec.json", {"dataset_id": "ds_1"}, "did you mean 'dataset'?"),
        ("spec.json", {"hyperparameters": [1, 2]}, "hyperparameters: must be an object"),
        ("spec.json", {"dataset": ["a.jsonl"]}, "dataset: must be a string, got ['a.jsonl']"),
    ],
)
def test_a_spec_file_mistake_is_one_error_line(tiny_model_dir, tmp_path, capsys, name, content, says):
    path = tmp_path / name
    if isinstance(content, dict):  # a valid spec, changed
        base = spec_for(tiny_model_dir, letter_dataset(tmp_path / "data.jsonl"))
        content = json.dumps({**base, **content})
    if content is not None:
        path.write_text(content)
    assert main(["run", str(path), "--output", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert says in line, line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_the_line_and_column_of_invalid_json(tmp_path, capsys):
    path = write_spec(tmp_path / "spec.json", {})
    path.write_text('{\n  "base_model": "m"\n  "dataset": "d.jsonl"\n}')
    assert main(["run", str(path), "--output", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys) == (
        f"error: {path}: not valid JSON: Expecting ',' delimiter at line 3, column 3"
    )


def test_the_worker_still_reads_a_stored_spec_with_the_apis_own_keys():
    """Only the CLI refuses keys a spec file has not: from_spec's default reads what it knows."""
    from trainer.config import ConfigError, RunConfig

    stored = {
        "name": "j",
        "base_model": "m",
        "dataset": "d.jsonl",
        "reward": A_SHARE,
        "webhook_url": None,
        "dataset_id": "ds_1",
    }
    assert RunConfig.from_spec(stored).dataset == "d.jsonl"
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_spec(stored, strict=True)
    assert caught.value.param == "dataset_id" and "did you mean 'dataset'?" in caught.value.message


# --- --output, export-merged, make-tiny-model ----------------------------------------------------


def test_an_output_that_is_a_file_or_cannot_be_made(tiny_model_dir, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.json", spec_for(tiny_model_dir, letter_dataset(tmp_path / "d.jsonl")))
    (tmp_path / "afile").write_text("")
    assert main(["run", str(spec), "--output", str(tmp_path / "afile")]) == 2
    assert (
        one_error_line(capsys)
        == f"error: --output {tmp_path / 'afile'} is a file; give a directory (made if missing)"
    )
    assert main(["run", str(spec), "--output", str(tmp_path / "afile" / "run")]) == 2
    assert (
        one_error_line(capsys) == f"error: cannot make --output {tmp_path / 'afile' / 'run'}: Not a directory"
    )
    assert (tmp_path / "afile").read_text() == ""


def test_export_merged_of_what_is_no_lora_checkpoint(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "merged")
    assert main(["export-merged", str(tmp_path / "missing"), out]) == 2
    assert one_error_line(capsys) == f"error: {tmp_path / 'missing'}: no such checkpoint directory"
    # a full fine-tune's checkpoint is a model directory without adapter_config.json, as the tiny model is
    assert main(["export-merged", str(tiny_model_dir), out]) == 2
    assert "is a full fine-tune's checkpoint, a whole model already" in one_error_line(capsys)
    (tmp_path / "run" / "checkpoints" / "step-000001").mkdir(parents=True)
    assert main(["export-merged", str(tmp_path / "run"), out]) == 2
    assert "is a run's output directory; give one of its checkpoints" in one_error_line(capsys)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--vocab-size", "10"], "--vocab-size must be at least 101"),
        (["--heads", "3"], "--hidden-size (64) must be a multiple of --heads (3)"),
        (["--layers", "0"], "--layers must be at least 1"),
    ],
)
def test_make_tiny_model_refuses_a_shape_it_cannot_build(tmp_path, capsys, options, says):
    with pytest.raises(SystemExit) as exited:
        main(["make-tiny-model", str(tmp_path / "tiny"), *options])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m trainer make-tiny-model: error: {says}" in err and "Traceback" not in err
    assert not (tmp_path / "tiny").exists()


# --- a prompt of zero tokens ----------------------------------------------------------------------


def model_that_drops_zero_width_characters(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny model, its tokenizer's normalizer removing control and format characters (BERT's
    clean_text: U+200B among them); it adds no BOS."""
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {
        "type": "BertNormalizer",
        "clean_text": True,
        "handle_chinese_chars": False,
        "strip_accents": False,
        "lowercase": False,
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def test_a_prompt_of_zero_tokens_is_refused_before_training_naming_its_line(tiny_model_dir, tmp_path, capsys):
    model = model_that_drops_zero_width_characters(tiny_model_dir, tmp_path / "model")
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Say a{i}:", "answer": "a"} for i in range(4)]
    data.write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:2]) + "\n" + json.dumps({"prompt": "\u200b\u200b"}) + "\n"
    )
    spec = write_spec(tmp_path / "spec.json", spec_for(model, data))
    assert main(["run", str(spec), "--output", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: line 4: the dataset's prompt '\\u200b\\u200b' is zero tokens"), line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no step ran


def test_a_chat_prompt_is_empty_only_as_the_model_gets_it(tiny_model_dir, tmp_path):
    """Invisible contents: a chat template's own text is tokens; without a template, nothing is."""
    from transformers import AutoTokenizer

    from trainer.prompts import PromptFormatter, check_no_empty_prompt

    model = model_that_drops_zero_width_characters(tiny_model_dir, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [{"prompt": "Say a"}, {"prompt": [{"role": "user", "content": "\u200b"}]}]
    check_no_empty_prompt(PromptFormatter(tokenizer, 32), rows)  # "user: \u200b\nassistant: "
    tokenizer.chat_template = None
    with pytest.raises(DatasetError) as caught:
        check_no_empty_prompt(PromptFormatter(tokenizer, 32), rows, "eval dataset")
    assert caught.value.line == 2 and caught.value.reason.startswith("the eval dataset's prompt '\\u200b'")


# --- --overwrite, a torn metrics.jsonl, Ctrl-C ------------------------------------------------------


def test_overwrite_deletes_the_earlier_run_only_once_the_new_one_trains(tiny_model_dir, tmp_path, capsys):
    data = letter_dataset(tmp_path / "data.jsonl", n=4)
    good = write_spec(tmp_path / "spec.json", spec_for(tiny_model_dir, data, max_steps=2))
    out = tmp_path / "out"
    assert main(["run", str(good), "--output", str(out)]) == 0, capsys.readouterr().err
    earlier = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert "checkpoints/step-000002" in earlier and (out / "metrics.jsonl").read_text().count("\n") == 2

    # refused by the spec's check, and by the model's loading (after TensorBoard's files were opened)
    noreward = {key: value for key, value in json.loads(good.read_text()).items() if key != "reward"}
    typo = write_spec(tmp_path / "typo.json", noreward)
    nomodel = write_spec(tmp_path / "nomodel.json", spec_for(tmp_path / "no-such-model", data, max_steps=2))
    for spec in (typo, nomodel):
        capsys.readouterr()
        assert main(["run", str(spec), "--output", str(out), "--overwrite"]) == 2
        assert one_error_line(capsys).startswith("error: ")
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == earlier

    # an --overwrite killed before its first step left the earlier run set aside: the next command
    # puts it back (here a --resume, which finds it complete)
    from trainer.__main__ import EarlierRun

    EarlierRun(out).set_aside()
    assert not (out / "checkpoints").exists()
    capsys.readouterr()
    assert main(["run", str(good), "--output", str(out), "--resume"]) == 0
    done = capsys.readouterr()
    assert "the run already reached step 2 of 2" in done.out and "put back the earlier run" in done.err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == earlier

    one_step = write_spec(tmp_path / "one.json", spec_for(tiny_model_dir, data, max_steps=1))
    assert main(["run", str(one_step), "--output", str(out), "--overwrite"]) == 0, capsys.readouterr().err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "tensorboard"]


def test_a_resume_drops_a_torn_last_line_of_metrics_jsonl(tiny_model_dir, tmp_path, capsys):
    """The process killed while it appended step 2's line, before step 2's checkpoint."""
    data = letter_dataset(tmp_path / "data.jsonl", n=4)
    spec = write_spec(tmp_path / "spec.json", spec_for(tiny_model_dir, data, max_steps=2))
    out = tmp_path / "out"
    assert main(["run", str(spec), "--output", str(out)]) == 0, capsys.readouterr().err
    whole = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints" / "step-000002")
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text[: len(text) - 40])
    capsys.readouterr()
    assert main(["run", str(spec), "--output", str(out), "--resume"]) == 0, capsys.readouterr().err
    assert "resuming at step 2/2" in capsys.readouterr().out
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in again] == [1, 2] and again[0] == whole[0]


def test_metrics_file_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "reward": 0.5}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + lines[2][:12])  # step 4's line, cut short
    said = []
    MetricsFile(path, keep_through=2, on_log=lambda level, message: said.append((level, message)))
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert said == [
        (
            "warning",
            f"{path}: dropped its last line 4, a write cut short when the run stopped; that step is "
            "trained again",
        )
    ]
    path.write_text(lines[0] + "\n" + lines[1][:12] + "\n" + lines[2] + "\n")  # a bad line among others
    with pytest.raises(TrainingError) as caught:
        MetricsFile(path, keep_through=3)
    assert str(caught.value).startswith(f"{path}: line 2 is not a step's metrics")
    assert path.read_text().count("\n") == 3  # left as it was


@pytest.mark.slow
def test_ctrl_c_in_a_one_process_run_is_one_line_and_130(tiny_model_dir, tmp_path):
    spec = write_spec(
        tmp_path / "spec.json",
        spec_for(tiny_model_dir, letter_dataset(tmp_path / "data.jsonl", n=4), max_steps=100_000),
    )
    command = [sys.executable, "-m", "trainer", "run", str(spec), "--output", str(tmp_path / "out")]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's process has it
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # training: at step 1
            if line.startswith("step 1/"):
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    # 130, or ended by the signal itself (CPython re-raises SIGINT at exit where it deems the
    # interrupt unhandled): a shell shows both as 130
    assert process.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGINT; `--resume` continues from the newest checkpoint in {tmp_path / 'out'}"
    )
