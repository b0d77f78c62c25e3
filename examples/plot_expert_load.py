"""Plot the expert load of an MoE training run from its ``--metrics-out`` JSONL file.

Each row of an MoE run carries ``expert_load`` ({layer: max / mean tokens per expert over
the step's global batch; 1.0 is perfectly balanced}) and, with a balancing or z-loss
coefficient, ``aux_loss`` / ``z_loss`` (their weighted values, summed over layers). The
plot has one line per MoE layer, and the aux loss on a second axis.

    python examples/plot_expert_load.py runs/moe.jsonl -o docs/img/expert_load.png
"""
import argparse
import json


def read_rows(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                if "expert_load" in row:
                    rows.append(row)
    if not rows:
        raise SystemExit(f"{path} has no 'expert_load' rows: is it the metrics of an MoE run?")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", help="the run's --metrics-out JSONL file")
    p.add_argument("-o", "--out", default="expert_load.png")
    args = p.parse_args(argv)
    rows = read_rows(args.metrics)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in rows[0]["expert_load"]:
        ax.plot(steps, [r["expert_load"][layer] for r in rows], label=f"layer {layer}")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean tokens per expert")
    ax.legend(loc="upper left", fontsize=8)
    if "aux_loss" in rows[0]:
        aux = ax.twinx()
        aux.plot(steps, [r["aux_loss"] for r in rows], color="black", lw=1, ls="--",
                 label="aux loss")
        aux.set_ylabel("weighted aux loss (dashed)")
    ax.set_title("expert load over training")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    last = rows[-1]
    print(f"{len(rows)} steps; last step {last['step']}: expert load "
          + ", ".join(f"layer {k} {v:.2f}" for k, v in last["expert_load"].items())
          + (f", aux loss {last['aux_loss']:.4f}" if "aux_loss" in last else "")
          + f"; wrote {args.out}")


if __name__ == "__main__":
    main()
