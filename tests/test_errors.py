"""Errors a person can read: a user error ends a bundle run or a tool with its message as the last
line of a short output; the full traceback stays one file (or SELFMEDMAE_TRACEBACK=1) away; bugs keep
their traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_runner import configs
from monai.bundle import ConfigParser

import selfmedmae_components.weights
from selfmedmae_components import errors
from selfmedmae_components.data.common import DatasetError
from selfmedmae_components.weights import CheckpointError, init_encoder

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], traceback_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != errors.ENV_VAR}
    if traceback_env is not None:
        env[errors.ENV_VAR] = traceback_env
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def bundle_run(run_id: str, config: str, traceback_env: str | None = None, **overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs("btcv_seg", config)]
    return run(cmd + [a for k, v in overrides.items() for a in (f"--{k}", str(v))], traceback_env)


def assert_short(proc: subprocess.CompletedProcess, message: str) -> Path:
    """The run failed with ``error: <message>`` as the last line of a short stderr and no traceback
    anywhere; returns the traceback file it names."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert len(lines) <= 5, proc.stderr  # MONAI's one-line "parsing config_file" warning, where to look, the error
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    full = Path(lines[-2].split("Full traceback: ")[1].split(" (")[0])
    assert full.is_file()
    return full


def test_bundle_run_with_a_text_file_as_checkpoint(tmp_path):
    (tmp_path / "model.txt").write_text("best model: epoch 12\n")
    proc = bundle_run(
        "evaluate", "evaluate", checkpoint=tmp_path / "model.txt", dataset_dir=tmp_path, bundle_root=tmp_path
    )
    full = assert_short(proc, f"{tmp_path / 'model.txt'} is not a PyTorch checkpoint")
    text = full.read_text()  # the whole story, MONAI's wrapper included
    assert "Traceback (most recent call last)" in text and "CheckpointError" in text and "Failed to evaluate" in text
    full.unlink()


def test_bundle_run_without_datalist_and_the_documented_full_traceback(tmp_path):
    (tmp_path / "data").mkdir()
    args = dict(dataset_dir=tmp_path / "data", bundle_root=tmp_path, hidden_size=48, decoder_hidden_size=48)
    message = f"Datalist not found: {tmp_path / 'data' / 'datalist.json'}"
    assert_short(bundle_run("pretrain", "pretrain", **args), message).unlink()
    # SELFMEDMAE_TRACEBACK=1 (README) prints Python's full traceback in place
    proc = bundle_run("pretrain", "pretrain", traceback_env="1", **args)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "Failed to" in proc.stderr and message in proc.stderr
    assert "Full traceback:" not in proc.stderr


@pytest.mark.parametrize("dataset, args", [("cxr14", ["--dataset_dir"]), ("btcv", []), ("brats", [])])
def test_prepare_tool_ends_with_a_clean_error(tmp_path, dataset, args):
    proc = run([sys.executable, str(REPO / "tools" / "prepare.py"), dataset, *args, str(tmp_path / "nowhere")])
    assert_short(proc, str(tmp_path / "nowhere")).unlink()
    assert len(proc.stderr.strip().splitlines()) == 2


def test_importing_the_package_changes_no_hook():
    """The short form is the bundle run's and the tools' choice (their first step installs it), not a side effect of
    ``import selfmedmae_components``: a program or test that imports the package keeps its own sys.excepthook."""
    code = (
        "import logging, sys\n"
        "hook = sys.excepthook\n"
        "import monai, selfmedmae_components, selfmedmae_components.config_imports  # what a bundle config imports\n"
        "assert sys.excepthook is hook, sys.excepthook\n"
        "assert not logging.getLogger('monai.handlers.StatsHandler').filters\n"
        "selfmedmae_components.errors.install()  # what the configs' first `run` expression and the tools do\n"
        "assert sys.excepthook is not hook and logging.getLogger('monai.handlers.StatsHandler').filters\n"
    )
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr


def test_a_damaged_datalist_is_named(tmp_path):
    from selfmedmae_components.data.common import load_datalist

    (tmp_path / "datalist.json").write_text('{"training": [')
    with pytest.raises(DatasetError, match=r"datalist.json is not a datalist JSON file"):
        load_datalist(tmp_path / "datalist.json", "training", tmp_path)


# ------------------------------------------------------------------ what counts as a user error
def through_monai_config(expression: str, **globals) -> RuntimeError:
    """The exception MONAI's bundle runner raises when a config expression fails."""
    parser = ConfigParser({"x": expression}, globals={"selfmedmae_components": selfmedmae_components, **globals})
    with pytest.raises(RuntimeError, match="Failed to evaluate") as err:
        parser.get_parsed_content("x")
    return err.value


def test_user_errors_are_found_inside_monai_wrappers(tmp_path):
    wrapped = through_monai_config(f"$selfmedmae_components.weights.load_state_dict('{tmp_path / 'none.pt'}')")
    assert isinstance(errors.find_user_error(wrapped), FileNotFoundError)  # raised by our `raise`: a user error
    wrapped = through_monai_config("$selfmedmae_components.weights.init_encoder(None, 'foo')")
    assert "init_mode must be one of" in str(errors.find_user_error(wrapped))
    for exc in (DatasetError("x"), CheckpointError("y")):
        assert errors.find_user_error(exc) is exc


def test_bugs_keep_their_traceback():
    assert errors.find_user_error(through_monai_config("$int('x')")) is None  # a ValueError, but not one of ours
    assert errors.find_user_error(through_monai_config("$selfmedmae_components.weights.init_encoder()")) is None

    def bug_while_handling_a_user_error():
        try:
            init_encoder(None, "foo")
        except ValueError:
            return {}["missing"]  # a new problem, with the user error only as its __context__

    assert errors.find_user_error(through_monai_config("$bug()", bug=bug_while_handling_a_user_error)) is None
    assert errors.find_user_error(RuntimeError("Failed to evaluate x")) is None  # no cause: not MONAI's wrapper
    # inside the package, only a `raise` statement makes a ValueError a user error, not int('x') failing
    module = {"__name__": "selfmedmae_components.some_module"}
    exec("def parse(x):\n    return int(x)\n\ndef check(x):\n    raise ValueError(f'bad x: {x}')\n", module)
    for function, user_error in ((module["parse"], False), (module["check"], True)):
        with pytest.raises(ValueError) as err:
            function("x")
        assert (errors.find_user_error(err.value) is err.value) == user_error


def test_hook_prints_message_or_falls_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(errors.tempfile, "gettempdir", lambda: str(tmp_path))
    seen = []
    error = DatasetError("the datalist names img9.nii.gz, which is missing")
    errors.excepthook(DatasetError, error, None, fallback=lambda *a: seen.append(a))
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "error: the datalist names img9.nii.gz, which is missing" and len(lines) == 2 and not seen
    assert "DatasetError" in next(tmp_path.glob("selfmedmae-error-*.txt")).read_text()
    bug = TypeError("unsupported operand")
    errors.excepthook(TypeError, bug, None, fallback=lambda *a: seen.append(a))
    monkeypatch.setenv(errors.ENV_VAR, "1")
    errors.excepthook(DatasetError, error, None, fallback=lambda *a: seen.append(a))
    assert [a[1] for a in seen] == [bug, error] and capsys.readouterr().err == ""


def test_stats_handler_logs_only_the_message_of_a_user_error():
    """MONAI's StatsHandler logs an engine's exception with logger.exception before re-raising it."""
    try:
        raise through_monai_config("$selfmedmae_components.weights.init_encoder(None, 'foo')")
    except RuntimeError:
        record = logging.LogRecord(
            "monai.handlers.StatsHandler",
            logging.ERROR,
            __file__,
            1,
            "Exception: %s",
            ("Failed to evaluate ...",),
            sys.exc_info(),
        )
    assert errors._UserErrorLogFilter().filter(record)
    assert record.exc_info is None and record.getMessage().startswith("Exception: init_mode must be one of")
