"""The report's malicious-server section, built from a real imprint run."""

from __future__ import annotations

import html
import json
import re

from medpfl.experiments.attack_run import AttackRunConfig, run_attack
from medpfl.report.build import build_report


def test_report_says_what_the_malicious_server_recovered_and_that_the_check_would_stop_it(tmp_path):
    run = tmp_path / "imprint"
    run_attack(AttackRunConfig(attack="imprint", batch_size=4, n_images=16, image_size=16), run)
    ssims = [s for line in (run / "results.jsonl").read_text().splitlines() for s in json.loads(line)["ssim"]]
    recovered = sum(s >= 0.9 for s in ssims)
    text = html.unescape(re.sub(r"<[^>]+>", " ", build_report(run).read_text()))
    text = re.sub(r"\s+", " ", text)
    assert f"A malicious server (imprint) read {recovered} of 16 images out of the updates" in text
    # 4 images in 16 equal bins: each alone with probability (15/16)^3 = 0.824.
    assert "expected share: 0.82, the chance that one of the 4 images" in text
    assert "a random other image of the data reaches it for 0.00" in text
    assert ("The sites' model check would have stopped it: it refuses 4 of the 4 models the server sent, "
            "e.g. \"The site refuses to train: the received model has 4 parameter(s)") in text
