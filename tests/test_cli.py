"""The `medpfl` command as a user runs it: files written, runs resumed, bad input named in one sentence."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from medpfl.cli import main
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source

QUICK = ["--image-size", "16", "--steps", "3", "--quiet"]


def run(argv: list[str]) -> int:
    return main(argv)


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory) -> Path:
    """A user's class-folder tree of real images (PNG), two classes."""
    root = tmp_path_factory.mktemp("user_data")
    source = embedded_source()
    items = sample_items(source.items, 6, seed=5)
    data = ImageDataset(source, items, size=48)
    for i, item in enumerate(items):
        folder = root / item.class_name
        folder.mkdir(exist_ok=True)
        array = (data.image(i).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(array).save(folder / f"img{i}.png")
    return root


def test_attack_writes_results_summary_config_and_grid(tmp_path):
    out = tmp_path / "run"
    assert run(["attack", "--attack", "idlg", "--n-images", "3", "--out", str(out), *QUICK]) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3
    summary = json.loads((out / "summary.json").read_text())
    for key in ("attack", "model", "n_images", "asr", "mean_ssim", "mean_psnr", "mean_mse", "label_accuracy",
                "reid_rate", "seconds_per_image"):
        assert key in summary
    assert summary["n_images"] == 3 and summary["model"] == "lenet-idlg"
    assert 0 <= summary["asr"] <= 1 and summary["label_accuracy"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and config["versions"]["torch"]
    assert Image.open(out / "reconstructions.png").size[0] > 16


def test_same_seed_same_results(tmp_path):
    for name in ("a", "b"):
        assert run(["attack", "--attack", "cpl", "--n-images", "2", "--out", str(tmp_path / name), *QUICK]) == 0
    first, second = ((tmp_path / n / "results.jsonl").read_text() for n in ("a", "b"))
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()]  # noqa: E731
    assert strip(first) == strip(second)


def test_interrupted_run_resumes_without_redoing_finished_victims(tmp_path):
    out = tmp_path / "run"
    args = ["attack", "--attack", "dlg", "--n-images", "3", "--victims-per-batch", "1", "--out", str(out), *QUICK]
    assert run(args) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    # Simulate a run killed while writing its third result: two whole lines and half of one.
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    kept = [json.loads(line)["victim"] for line in lines[:2]]
    assert run(args) == 0
    after = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["victim"] for r in after] == kept + [2]
    assert json.loads((out / "summary.json").read_text())["n_images"] == 3


def test_resuming_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["attack", "--n-images", "1", "--out", str(out), *QUICK]) == 0
    assert run(["attack", "--n-images", "1", "--seed", "4", "--out", str(out), *QUICK]) == 2
    message = capsys.readouterr().err
    assert "other settings" in message and "seed" in message and "Traceback" not in message


def test_attack_on_a_users_class_folders_with_batches(tmp_path, class_folders):
    out = tmp_path / "run"
    assert run(["attack", "--data", str(class_folders), "--attack", "idlg", "--batch-size", "2", "--n-images", "4",
                "--out", str(out), *QUICK]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 4 and summary["n_victims"] == 2 and summary["batch_size"] == 2
    assert summary["label_accuracy"] == 1.0


def test_inverting_gradients_runs_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert run(["attack", "--attack", "invgrad", "--model", "convnet", "--restarts", "2", "--n-images", "2",
                "--out", str(out), *QUICK]) == 0
    assert json.loads((out / "summary.json").read_text())["model"] == "convnet"
    assert not (out / "checkpoint.pt").exists()  # finished batches leave no optimiser state behind
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["labels_granted"] is True and config["bn_mode_used"] == "eval"  # as the paper ran it


def test_a_killed_inverting_gradients_run_goes_on_from_its_checkpoint_to_the_same_results(tmp_path):
    """kill -9 in the middle of the optimisation, then the same command again: nothing is redone from the
    start and the results equal an uninterrupted run's."""
    args = ["attack", "--attack", "invgrad", "--model", "convnet", "--restarts", "2", "--n-images", "2",
            "--steps", "300", "--checkpoint-every", "0", "--quiet"]
    assert run([*args, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "medpfl.cli", *args, "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def saved_step() -> int:  # the file is replaced atomically, so it is always whole
        path = killed / "checkpoint.pt"
        return torch.load(path, weights_only=True)["state"]["progress"]["step"] if path.exists() else -1

    while saved_step() < 10:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert not (killed / "results.jsonl").exists()  # killed before the batch ended
    assert 10 <= saved_step() < 300
    assert run([*args, "--out", str(killed)]) == 0
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                          for line in (path / "results.jsonl").read_text().splitlines()]
    assert strip(killed) == strip(tmp_path / "whole")
    assert not (killed / "checkpoint.pt").exists()


def test_inverting_gradients_can_be_made_to_recover_the_labels_of_a_batch(tmp_path):
    out = tmp_path / "run"
    assert run(["attack", "--attack", "invgrad", "--model", "convnet", "--labels", "recovered", "--restarts", "1",
                "--bn-mode", "train", "--batch-size", "2", "--n-images", "4", "--out", str(out), *QUICK]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["labels_granted"] is False and config["bn_mode_used"] == "train"
    assert json.loads((out / "summary.json").read_text())["label_accuracy"] == 1.0


@pytest.mark.parametrize("argv, words", [
    (["data", "inspect", "/no/such/folder"], "/no/such/folder"),
    (["attack", "--data", "/no/such/folder", "--quiet"], "/no/such/folder"),
    (["attack", "--n-images", "3", "--batch-size", "2", "--quiet"], "--batch-size"),
    (["attack", "--set", "tv_weight", "--quiet"], "KEY=VALUE"),
    (["attack", "--set", "nonsense=1", "--quiet"], "no setting 'nonsense'"),
    (["attack", "--checkpoint-every", "-5", "--quiet"], "--checkpoint-every -5.0 must be 0 or more"),
])
def test_bad_input_gets_one_clear_sentence(argv, words, capsys, tmp_path):
    assert run([*argv[:2], *argv[2:], *(["--out", str(tmp_path / "r")] if argv[0] == "attack" else [])]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_data_inspect_and_sample_report_the_embedded_set(capsys):
    assert run(["data", "sample"]) == 0
    assert "726" in capsys.readouterr().out
    assert run(["data", "inspect", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_items"] == 726
