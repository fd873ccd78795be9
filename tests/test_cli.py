"""The `medpfl` command as a user runs it: files written, runs resumed, bad input named in one sentence."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from medpfl.attacks import build_attack
from medpfl.cli import main
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.experiments.attack_run import AttackRunConfig, attack_generator, victim_model

QUICK = ["--image-size", "16", "--steps", "3", "--quiet"]


def run(argv: list[str]) -> int:
    return main(argv)


def _save_class_folders(root: Path, n: int, size: int) -> Path:
    """`n` real images of the embedded set (a class-stratified draw) as PNGs, one sub-folder per class."""
    source = embedded_source()
    items = sample_items(source.items, n, seed=5)
    data = ImageDataset(source, items, size=size)
    for i, item in enumerate(items):
        folder = root / item.class_name
        folder.mkdir(exist_ok=True)
        array = (data.image(i).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(array).save(folder / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory) -> Path:
    """A user's class-folder tree of real images (PNG): one image of each of the embedded set's six classes."""
    return _save_class_folders(tmp_path_factory.mktemp("user_data"), 6, 48)


def test_attack_writes_results_summary_config_and_grid(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["attack", "--attack", "idlg", "--n-images", "3", "--out", str(out), *QUICK]) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3
    summary = json.loads((out / "summary.json").read_text())
    for key in ("attack", "model", "n_images", "asr", "mean_ssim", "mean_psnr", "mean_mse", "label_accuracy",
                "reid_rate", "seconds_per_image"):
        assert key in summary
    assert summary["n_images"] == 3 and summary["model"] == "lenet-idlg"
    # The summary is the results' aggregate: ASR is the share of images at SSIM >= 0.9.
    ssims = [s for line in lines for s in json.loads(line)["ssim"]]
    assert summary["asr"] == sum(s >= 0.9 for s in ssims) / 3
    assert summary["mean_ssim"] == pytest.approx(sum(ssims) / 3) and summary["label_accuracy"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and config["versions"]["torch"]
    assert Image.open(out / "reconstructions.png").size[0] > 16
    # Re-identification comes with its chance level: the gallery is the whole verified source (all 726
    # embedded images, fewer than the 2,000 cap), so a random guess is right 1 / 726 of the time.
    assert summary["reid_gallery_size"] == 726 and summary["reid_chance"] == pytest.approx(1 / 726)
    printed = capsys.readouterr().out
    assert "726 images" in printed and "0.0014" in printed
    # --device auto takes the GPU when there is one, and the run records what it used.
    gpu = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert config["config"]["device"] == "auto" and config["config"]["device_used"] == gpu



def test_every_rate_of_an_attack_comes_with_its_95_percent_interval_and_an_observed_verdict(tmp_path, capsys):
    from scipy.stats import binomtest

    out = tmp_path / "run"
    assert run(["attack", "--attack", "idlg", "--n-images", "4", "--out", str(out), *QUICK]) == 0
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    hits = {"asr": sum(s >= 0.9 for r in lines for s in r["ssim"]),
            "label_accuracy": sum(h for r in lines for h in r["label_correct"]), "reid_rate": sum(summary["reidentified"])}
    for key, k in hits.items():  # labels and re-identification are scored per image, like ASR
        wilson = binomtest(k, 4).proportion_ci(confidence_level=0.95, method="wilson")
        assert summary[f"{key}_n"] == 4
        assert (summary[f"{key}_low"], summary[f"{key}_high"]) == pytest.approx((wilson.low, wilson.high), abs=1e-9)
    printed = " ".join(capsys.readouterr().out.split())
    assert f"{summary['asr_low']:.2f}-{summary['asr_high']:.2f}" in printed  # beside the ASR in the table
    if hits["asr"] == 0:  # 3 L-BFGS steps reconstruct nothing: what was observed, and how high the rate may be
        assert "no attack tried reconstructed any of 4 images" in printed and "may be up to 0.49" in printed
    assert "safe" not in printed.lower()


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
    # Its chance level: two random labels of K classes, scored as a multiset per victim like the attack, hit
    # 1 - (1 - 1/K)^2 of a victim's images of two classes (a class is missed only if both guesses miss it),
    # 1/K of two images of one class (the guesses name it 2/K times on average), not 1/K in general.
    K = summary["num_classes"]
    labels = [json.loads(line)["labels"] for line in (out / "results.jsonl").read_text().splitlines()]
    expected = sum(1 - (1 - 1 / K) ** 2 if len(set(pair)) == 2 else 1 / K for pair in labels) / len(labels)
    assert any(len(set(pair)) == 2 for pair in labels) and summary["label_chance"] == pytest.approx(expected)
    low = 4 / (4 + 1.959964 ** 2)  # Wilson's lower bound at 4 of 4: n / (n + z^2)
    assert f"1.00 [{low:.2f}-1.00] (chance {expected:.2f})" in (out / "report.html").read_text()


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


def test_paper_sets_the_papers_single_start_procedure_for_every_attack(tmp_path):
    out = tmp_path / "run"
    assert run(["attack", "--paper", "--n-images", "1", "--out", str(out), "--image-size", "16", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["paper"] is True
    assert config["attack_settings"]["restarts"] == 0 and config["attack_settings"]["steps"] == 300
    assert json.loads((out / "results.jsonl").read_text())["runs"] == 1  # one start, never restarted
    def procedure(attack: str):
        return build_attack(attack, **AttackRunConfig(attack=attack, paper=True).attack_settings)
    assert all(procedure(a).settings.restarts == 0 and procedure(a).settings.steps == 300 for a in ("dlg", "idlg"))
    assert (procedure("invgrad").settings.steps, procedure("invgrad").settings.restarts) == (24_000, 8)
    # Without --paper the L-BFGS attacks restart failed victims (not the paper's procedure).
    assert build_attack("idlg", **AttackRunConfig().attack_settings).settings.restarts == 7


def test_starting_noise_and_model_weights_come_from_independent_streams():
    """The attacker's generator and the victims' weights never share a stream: the first victim's
    weights are not the attacker's first draws, for any seed."""
    for seed in (0, 1, 5):
        config = AttackRunConfig(attack="idlg", seed=seed)
        weights = next(victim_model(config, 6, 0).parameters()).detach().flatten()
        attacker = attack_generator(config, [0])
        draws = torch.rand(weights.numel(), generator=attacker) - 0.5  # what U(-0.5, 0.5) would take
        assert not torch.allclose(draws, weights)
        # Different victims, and the attacker's batches, draw from different streams too.
        assert not torch.equal(weights, next(victim_model(config, 6, 1).parameters()).detach().flatten())
        assert attack_generator(config, [0]).initial_seed() != attack_generator(config, [64]).initial_seed()


@pytest.fixture(scope="module")
def folder_with_broken_files(tmp_path_factory, class_folders) -> tuple[Path, list[str]]:
    """The user's class folders plus a truncated JPEG, an empty PNG and a text file named .png."""
    root = tmp_path_factory.mktemp("broken_data")
    shutil.copytree(class_folders, root, dirs_exist_ok=True)
    cls = sorted(p for p in root.iterdir() if p.is_dir())[0]
    jpeg = io.BytesIO()
    Image.open(next(cls.glob("*.png"))).convert("RGB").resize((256, 256)).save(jpeg, "JPEG", quality=95)
    (cls / "truncated.jpeg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (cls / "empty.png").write_bytes(b"")
    (cls / "notes.png").write_text("this is not an image\n")
    return root, ["truncated.jpeg", "empty.png", "notes.png"]


def test_broken_files_are_named_before_the_attack_and_left_out_of_everything(tmp_path, folder_with_broken_files,
                                                                             capsys):
    root, broken = folder_with_broken_files
    out = tmp_path / "run"
    assert run(["attack", "--data", str(root), "--n-images", "6", "--restarts", "0", "--out", str(out), *QUICK]) == 0
    err = capsys.readouterr().err
    assert all(name in err for name in broken) and "3 file(s)" in err
    skipped = json.loads((out / "skipped.json").read_text())
    assert sorted(Path(s["path"]).name for s in skipped) == sorted(broken) and all(s["reason"] for s in skipped)
    summary = json.loads((out / "summary.json").read_text())
    # All six good images attacked; the gallery holds only verified images.
    assert summary["n_images"] == 6 and summary["reid_gallery_size"] == 6 and summary["skipped_files"] == 3


def test_strict_refuses_broken_files_before_any_work(tmp_path, folder_with_broken_files, capsys):
    root, broken = folder_with_broken_files
    out = tmp_path / "run"
    assert run(["attack", "--data", str(root), "--strict", "--n-images", "2", "--out", str(out), *QUICK]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in broken) and "--strict" in err and "Traceback" not in err
    assert not out.exists()


@pytest.fixture(scope="module")
def folder_with_a_truncated_png(tmp_path_factory) -> tuple[Path, Path]:
    """Two classes of six real images each as PNG files, one of them cut short in its pixel data."""
    root = tmp_path_factory.mktemp("truncated")
    source = embedded_source()
    for name in ("CT", "MR"):
        items = sample_items([it for it in source.items if it.class_name == name], 6, seed=1)
        data = ImageDataset(source, items, size=32)
        (root / name).mkdir(parents=True)
        for i in range(6):
            array = (data.image(i).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(array).save(root / name / f"img{i}.png")
    broken = root / "MR" / "img3.png"
    broken.write_bytes(broken.read_bytes()[:200])
    return root, broken


def test_train_skips_names_and_lists_a_truncated_png_like_attack_and_strict_refuses_it(tmp_path, capsys,
                                                                                      folder_with_a_truncated_png):
    root, broken = folder_with_a_truncated_png
    args = ["train", "--data", str(root), "--sites", "2", "--rounds", "1", "--image-size", "16", "--quiet"]
    assert run([*args, "--strict", "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err.replace("\n", "") and "--strict" in err and not (tmp_path / "strict").exists()
    out = tmp_path / "run"
    assert run([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 file(s)" in err and broken.name in err
    (skipped,) = json.loads((out / "skipped.json").read_text())
    assert Path(skipped["path"]) == broken and "truncated" in skipped["reason"]
    # The eleven readable images are all there is: the sites' and the test set's, the broken one in neither.
    federation = json.loads((out / "federation.json").read_text())
    assert sum(federation["n_images"]) + federation["n_test"] == 11


def test_audit_names_and_lists_a_data_sets_broken_file_before_any_job_and_strict_refuses_it(
        tmp_path, capsys, folder_with_a_truncated_png):
    root, broken = folder_with_a_truncated_png
    config = tmp_path / "audit.yaml"
    config.write_text(f"data: {{mine: {root}}}\nimage_size: 16\nn_images: 2\n"
                      "attacks: [{name: idlg, settings: {steps: 2, restarts: 0}}]\n")
    assert run(["audit", str(config), "--strict", "--out", str(tmp_path / "strict"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert broken.name in err and "--strict" in err and not (tmp_path / "strict").exists()
    out = tmp_path / "audit"
    assert run(["audit", str(config), "--out", str(out), "--quiet"]) == 0
    assert "1 file(s)" in capsys.readouterr().err
    for listing in (out / "mine" / "skipped.json", out / "mine" / "idlg-none-seed0" / "skipped.json"):
        assert [Path(s["path"]) for s in json.loads(listing.read_text())] == [broken]


def test_data_inspect_names_long_paths_whole_in_a_log_file(tmp_path, class_folders):
    """Not a terminal (a log file, CI): the skipped file's full path is printed, never cut to 80 columns."""
    deep = tmp_path / ("a-rather-long-folder-name-for-one-hospital-site" * 2) / "scans"
    shutil.copytree(class_folders, deep)
    broken = sorted(p for p in deep.iterdir() if p.is_dir())[0] / "scan-with-a-descriptive-name-truncated.png"
    broken.write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "medpfl.cli", "data", "inspect", str(deep), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert str(broken) in done.stdout


@pytest.mark.parametrize("argv, words", [
    (["data", "inspect", "/no/such/folder"], "/no/such/folder"),
    (["attack", "--data", "/no/such/folder", "--quiet"], "/no/such/folder"),
    (["attack", "--n-images", "3", "--batch-size", "2", "--quiet"], "--batch-size"),
    (["attack", "--set", "tv_weight", "--quiet"], "KEY=VALUE"),
    (["attack", "--set", "nonsense=1", "--quiet"], "no setting 'nonsense'"),
    (["attack", "--checkpoint-every", "-5", "--quiet"], "--checkpoint-every -5.0 must be 0 or more"),
    (["attack", "--paper", "--restarts", "3", "--quiet"], "drop --paper or the --restarts option"),
    (["attack", "--paper", "--attack", "invgrad", "--steps", "100", "--quiet"], "--paper sets steps"),
    (["attack", "--paper", "--attack", "update-inversion", "--quiet"], "not one of the paper's attacks"),
    (["attack", "--device", "nonsense", "--quiet"], "--device 'nonsense' is not a device name"),
    (["attack", "--device", "cuda:7", "--quiet"], "no such CUDA device"),
    (["attack", "--seed", "-1", "--quiet"], "--seed -1 is negative"),
    (["attack", "--model-state", "/no/such/state.pt", "--quiet"], "'/no/such/state.pt' does not exist"),
    (["attack", "--pretrain-steps", "-1", "--quiet"], "--pretrain-steps -1 must be 0 or more"),
])
def test_bad_input_gets_one_clear_sentence(argv, words, capsys, tmp_path):
    assert run([*argv[:2], *argv[2:], *(["--out", str(tmp_path / "r")] if argv[0] == "attack" else [])]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_data_of_one_class_is_refused_before_an_audit_that_could_find_nothing(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    # A one-class model's cross-entropy is zero whatever its weights, so the update it shares is zero.
    logits = torch.randn(3, 1, requires_grad=True)
    torch.nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long)).backward()
    assert torch.equal(logits.grad, torch.zeros(3, 1))
    folder = tmp_path / "ct"  # a flat folder of CT files: one class, from their Modality
    folder.mkdir()
    for name in ("CT_small.dcm", "693_UNCR.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    assert run(["data", "inspect", str(folder), "--quiet"]) == 0  # looking at it is fine
    capsys.readouterr()
    for command in (["attack", "--n-images", "1"], ["train", "--rounds", "1", "--sites", "1"]):
        out = tmp_path / command[0]
        assert run([*command, "--data", str(folder), "--out", str(out), "--quiet"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "holds images of one class only (CT)" in err and "Traceback" not in err
        assert not (out / "summary.json").exists()


def test_data_inspect_and_sample_report_the_embedded_set(capsys):
    assert run(["data", "sample"]) == 0
    assert "726" in capsys.readouterr().out
    assert run(["data", "inspect", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_items"] == 726


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_pretrained_victims_models_are_more_confident_and_each_update_is_described(tmp_path):
    """--pretrain-steps trains every victim's model on images it is not attacked on; each result says how
    large the observed update was and how sure the model was of the true class."""
    args = ["attack", "--n-images", "6", "--restarts", "0", *QUICK]
    assert run([*args, "--out", str(tmp_path / "fresh")]) == 0
    assert run([*args, "--pretrain-steps", "400", "--out", str(tmp_path / "trained")]) == 0
    fresh, trained = _results(tmp_path / "fresh"), _results(tmp_path / "trained")
    assert all(r["update_norm"] > 0 and 0 < r["p_true"][0] < 1 for r in fresh + trained)
    mean = lambda results: sum(r["p_true"][0] for r in results) / len(results)  # noqa: E731
    assert mean(trained) > mean(fresh) + 0.15, (mean(trained), mean(fresh))
    config = json.loads((tmp_path / "trained" / "config.json").read_text())["config"]
    assert config["pretrain_steps"] == 400


def test_pretraining_never_sees_the_attacked_images():
    from medpfl.experiments.attack_run import AttackRunConfig, _pretrain_data

    source = embedded_source()
    attacked = sample_items(source.items, 700, seed=0)
    images, _ = _pretrain_data(AttackRunConfig(pretrain_steps=1, image_size=8), source, attacked, torch.device("cpu"))
    others = [it for it in source.items if it not in attacked]
    expected = ImageDataset(source, others, size=8).load_batch(range(len(others)))[0]
    assert len(images) == len(others) == 26
    assert torch.equal(images.sum((1, 2, 3)).sort().values, expected.sum((1, 2, 3)).sort().values)


def test_model_state_is_the_model_attacked_and_a_mismatched_one_is_named(tmp_path, capsys):
    from medpfl.models.registry import build_model

    state = tmp_path / "trained.pt"
    model = build_model("lenet-idlg", 6, 3, 16, seed=123)
    torch.save(model.state_dict(), state)
    out = tmp_path / "run"
    assert run(["attack", "--n-images", "2", "--restarts", "0", "--model-state", str(state), "--out", str(out),
                *QUICK]) == 0
    source = embedded_source()
    by_id = {it.item_id: it for it in source.items}
    for result in _results(out):
        x, y = ImageDataset(source, [by_id[result["items"][0]]], size=16).load_batch([0])
        with torch.no_grad():
            assert abs(model(x).softmax(-1)[0, y[0]].item() - result["p_true"][0]) < 1e-5

    torch.save(build_model("lenet-idlg", 2, 3, 16).state_dict(), state)
    assert run(["attack", "--model-state", str(state), "--out", str(tmp_path / "other"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "'fc.weight' is (2, 192) in the file but (6, 192)" in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "other").exists()  # refused before the run directory is touched


def test_train_on_one_image_per_class_names_the_empty_test_set_in_one_sentence(tmp_path, capsys, class_folders):
    """Six classes of one file each: the split keeps every class's only file for training, so no image is held
    out to score the model on (this crashed in the utility evaluation)."""
    assert run(["train", "--data", str(class_folders), "--sites", "2", "--rounds", "1", "--image-size", "16",
                "--model", "lenet-idlg", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "held-out test set" in err and "at least 2" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def two_per_class(tmp_path_factory) -> Path:
    """A user's class folders of real images (PNG), two of each of six classes: enough to hold one out."""
    return _save_class_folders(tmp_path_factory.mktemp("two_per_class"), 12, 16)


def test_a_training_runs_attacks_come_with_re_identification_and_chance_levels(tmp_path, two_per_class):
    """`medpfl train` scores its attacked images as `medpfl attack` does: re-identified against the data, and
    beside what a random image of the data scores (a mean SSIM of 0.37 on chest X-rays, whose random pairs
    score 0.60, is no leak; the training report gave neither)."""
    root = two_per_class
    data = ImageDataset(embedded_source(), sample_items(embedded_source().items, 12, seed=5), size=16)
    out = tmp_path / "run"
    assert run(["train", "--data", str(root), "--sites", "2", "--rounds", "1", "--protocol", "fedsgd",
                "--model", "lenet-idlg", "--attack", "idlg", "--attack-rounds", "1", "--attack-sites", "0,1",
                "--attack-batch", "1", "--out", str(out), "--image-size", "16", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    attacked = [json.loads(line) for line in (out / "attacks.jsonl").read_text().splitlines()]
    assert summary["reid_gallery_size"] == len(list(root.rglob("*.png"))) == 12  # every image of the data
    assert summary["reid_chance"] == pytest.approx(1 / 12) and len(summary["reidentified"]) == len(attacked) == 2
    # A reconstruction that is the image itself (SSIM > 0.99) is nearest to its own original.
    exact = [hit for a, hit in zip(sorted(attacked, key=lambda a: (a["round"], a["site"])), summary["reidentified"])
             if a["ssim"][0] > 0.99]
    assert exact and all(exact)
    # A random other image of these six modalities is never a recognisable copy: checked with scikit-image.
    from skimage.metrics import structural_similarity
    gray = [data.image(i).mean(0).numpy() for i in range(len(data))]
    assert max(structural_similarity(a, b, data_range=1.0) for i, a in enumerate(gray) for b in gray[i + 1:]) < 0.9
    assert summary["asr_chance"] == 0.0 and 0 < summary["mean_ssim_chance"] < 0.9
    page = " ".join((out / "report.html").read_text().split())
    assert "(chance 1/12)" in page and "a random image of the data scores" in page


def test_a_training_report_counts_an_image_attacked_in_two_rounds_once(tmp_path, two_per_class):
    """A site of one image attacked at rounds 1 and 2: one patient, two reconstructions (the data section said
    it attacked 2 images, and counted its class twice)."""
    out = tmp_path / "run"
    assert run(["train", "--data", str(two_per_class), "--sites", "2", "--site-images", "1", "--rounds", "2",
                "--protocol", "fedsgd", "--model", "lenet-idlg", "--attack", "idlg", "--attack-rounds", "1,2",
                "--attack-sites", "0", "--out", str(out), *QUICK]) == 0
    (first, second) = [json.loads(line) for line in (out / "attacks.jsonl").read_text().splitlines()]
    assert first["items"] == second["items"] and len(first["items"]) == 1
    page = " ".join((out / "report.html").read_text().split())
    assert "attacked 1 image (2 reconstructions over the attacked rounds)" in page
