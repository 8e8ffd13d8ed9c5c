#!/usr/bin/env python3
"""Markdown table of the stage-1 study (docs/KFORCING-notes.md) from the run directories.

    python3 tools/recipes/study_table.py RUNS_DIR [ARM ...]

RUNS_DIR holds one `kfrun distill --k 1 --recipe configs/study/s1-ARM.json --out RUNS_DIR/ARM`
run per arm (tools/recipes/study.sh). Each row: the arm's recipe knobs, its budget (updates x
sequences x context = tokens through teacher and student), and every validation point
(step: held-out agreement with the teacher's inverse-CDF map on 64 x 128 (context, u) pairs).
`windows` M is the number of noise windows per context position (M (context, u) pairs per
context token: one teacher and one context pass serve them).
"""
import json
import os
import sys


def knobs(recipe):
    st = recipe["stages"][0]
    tau = recipe.get("tau", {"const": 1.0})
    tau = "1" if tau == {"const": 1.0} else ("U[%g,%g]" % (tau["uniform"]["lo"], tau["uniform"]["hi"]) if "uniform" in tau else str(tau))
    return (st.get("lr", recipe["optim"]["lr"]), st.get("batch_size", recipe["batch_size"]), st["total_steps"],
            tau, recipe.get("noise_init", "normal"), recipe["ctx_len"],
            st.get("windows", recipe.get("windows", 1)))


def main():
    runs = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    arms = sys.argv[2:] or sorted(os.listdir(runs))
    print("| arm | lr | batch | windows | steps | tau (train) | noise init | context tokens | agreement by step (val, tau 1) | final val loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        m = os.path.join(runs, arm, "k1", "metrics.jsonl")
        cfg = os.path.join(here, "..", "..", "configs", "study", "s1-%s.json" % arm)
        if not (os.path.exists(m) and os.path.exists(cfg)):
            continue
        lr, b, steps, tau, init, ctx, windows = knobs(json.load(open(cfg)))
        evals = [json.loads(l) for l in open(m) if '"val_acc"' in l]
        pts = ", ".join("%d: %.4f" % (e["step"], e["val_acc"]) for e in evals)
        last = evals[-1] if evals else {}
        done = last.get("step") == steps
        print("| %s | %g | %d | %d | %d%s | %s | %s | %.2fM | %s | %s |" % (
            arm, lr, b, windows, steps, "" if done else " (stopped at %s)" % last.get("step", 0), tau, init,
            steps * b * ctx / 1e6, pts, "%.3f" % last["val_loss"] if last else "-"))


if __name__ == "__main__":
    main()
