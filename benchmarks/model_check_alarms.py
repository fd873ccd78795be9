"""False alarms of the sites' model check (fl.model_check) on honest federations: every round's global model.

Honest in-process federations (4 sites, FedAvg, one local epoch of batch 16, lr 0.05, momentum 0.9, 3x16x16,
at most 100 images per site), for the paper's LeNets, the ConvNet (GroupNorm) and the MLP, IID and Dirichlet(0.3)
partitions and several seeds. Before every round the check a site runs (the fingerprint of the site's own
build of the agreed model, then the imprint and trap signatures) judges the model the server sent; every
site receives that same model, so one verdict per round stands for all four. Beside the verdicts, how close
the honest layers came to the signatures: the largest ladder of near-parallel rows with distinct thresholds
(an imprint needs fl.model_check.MIN_IMPRINT_ROWS) and the largest median ratio of negative to positive
weight magnitudes of a fully connected layer of 32 rows or more (a trap needs more than TRAP_RATIO).

    OMP_NUM_THREADS=1 python benchmarks/model_check_alarms.py                          # embedded set
    OMP_NUM_THREADS=1 python benchmarks/model_check_alarms.py --data DIR --name dermoscopy

JSON goes to benchmarks/results/model_check_alarms_NAME.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from medpfl.experiments.run_dir import library_versions
from medpfl.fl.flower.federation import FederationSpec, federation_data, global_model
from medpfl.fl.gradients import functional_model
from medpfl.fl.model_check import MIN_IMPRINT_ROWS, TRAP_RATIO, ModelCheck, fingerprint, signature_margins
from medpfl.fl.simulation import InProcessFederation

MODELS = ("lenet-dlg", "lenet-idlg", "lenet-cpl", "convnet", "mlp")
PARTITIONS = ("iid", "dirichlet:0.3")


def honest_run(spec: FederationSpec) -> dict:
    """One honest federation; the check's verdict and the signature margins at every round."""
    data = federation_data(spec)
    model = functional_model(global_model(spec, data.num_classes))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    check = ModelCheck(fingerprint(weights))
    engine = InProcessFederation(model, data.sites, data.num_classes, spec.training, spec.seed, vectorise=False)
    rounds = []
    for r in range(1, spec.rounds + 1):
        rounds.append({"round": r, "refused": check.verify(weights), **signature_margins(weights)})
        weights = engine.run_round(weights, r).weights
    return {"model": spec.model, "partition": spec.partition, "seed": spec.seed, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="a source (default: the embedded set)")
    parser.add_argument("--name", default="embedded")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    runs = []
    for model in MODELS:
        for partition in PARTITIONS:
            for seed in range(args.seeds):
                spec = FederationSpec(data=args.data, sites=4, partition=partition, site_images=100, model=model,
                                      norm="group", image_size=16, channels=3, rounds=args.rounds,
                                      protocol="fedavg", local_epochs=1, local_batch=16, lr=0.05, momentum=0.9,
                                      seed=seed)
                run = honest_run(spec)
                alarms = sum(r["refused"] is not None for r in run["rounds"])
                print(f"{model} {partition} seed {seed}: {alarms} alarms in {len(run['rounds'])} rounds, "
                      f"largest ladder {max(r['largest_ladder'] for r in run['rounds'])}, largest negative excess "
                      f"{max(r['largest_negative_excess'] for r in run['rounds']):.3f}", flush=True)
                runs.append(run)
    checks = [r for run in runs for r in run["rounds"]]
    out = Path(__file__).parent / "results" / f"model_check_alarms_{args.name}.json"
    out.write_text(json.dumps({
        "data": args.data or "embedded", "sites": 4, "rounds_checked": len(checks),
        "false_alarms": sum(r["refused"] is not None for r in checks),
        "largest_ladder": max(r["largest_ladder"] for r in checks), "imprint_needs": MIN_IMPRINT_ROWS,
        "largest_negative_excess": max(r["largest_negative_excess"] for r in checks), "trap_needs_above": TRAP_RATIO,
        "runs": runs, "seconds": time.perf_counter() - started,
        "machine": platform.processor() or platform.machine(), "versions": library_versions()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
