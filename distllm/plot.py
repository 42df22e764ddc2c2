"""``distllm plot RUN_DIR``: loss, validation (perplexity, bits per byte), learning rate, throughput and,
when the run scored tasks (``eval/<task>/acc`` records), downstream accuracy curves as one PNG.

A run that was resumed has a ``{"step": N, "event": "resume", "checkpoint": ...}`` record in its
``metrics.jsonl`` for each resume; every panel marks those steps with a dashed vertical line.
"""

from __future__ import annotations

from pathlib import Path

from distllm.errors import DataError
from distllm.metrics import read_metrics

RESUME = "resume"  # gid of the resume markers (tests find them by it)


def plot_run(run_dir: str, out: str | None = None) -> tuple[Path, list[int]]:
    """Write the curves of ``run_dir`` to ``out`` (default RUN_DIR/curves.png); return it and the resume steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"no metrics.jsonl in {run_dir}; is it a run directory of `distllm train`?")
    records = read_metrics(path)
    fig = draw(records, f"distllm run {Path(run_dir).resolve().name}")
    if fig is None:
        raise DataError(f"{path} has no training or validation records yet")
    out_path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path, resume_steps(records)


def resume_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r.get("event") == "resume"]


def draw(records: list[dict], title: str):
    """The figure of a run's records (None if it has no training or validation record)."""
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r and "lr" in r]  # not skipped-step records
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        return None

    tasks = eval_series(records)
    rows = 3 if tasks else 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.5 * rows), constrained_layout=True, squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)")

    ax = axes[0, 1]
    if val:
        ax.plot([r["step"] for r in val], [r["val_ppl"] for r in val], "o-", color="C1")
        ax.set_yscale("log")
    ax.set(title="validation perplexity", xlabel="step", ylabel="perplexity")
    bpb = [r for r in val if r.get("val_bpb") is not None]
    if bpb:
        twin = ax.twinx()
        twin.plot([r["step"] for r in bpb], [r["val_bpb"] for r in bpb], "s--", color="C5", alpha=0.7)
        twin.set_ylabel("bits per byte")

    ax = axes[1, 0]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="C2")
    ax.set(title="learning rate", xlabel="step", ylabel="learning rate")

    ax = axes[1, 1]
    ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="C3")
    ax.set(title="throughput", xlabel="step", ylabel="tokens/s")
    mfu = ax.twinx()
    known = [r for r in train if r.get("mfu") is not None]  # None: a device of unknown peak
    mfu.plot([r["step"] for r in known], [100 * r["mfu"] for r in known], color="C4", alpha=0.5)
    mfu.set_ylabel("MFU (%)")

    if tasks:
        for ax, metric in zip(axes[2], ("acc_norm", "acc")):
            for k, (task, series) in enumerate(sorted(tasks.items())):
                points = series.get(metric, [])
                if points:
                    ax.plot([s for s, _ in points], [v for _, v in points], "o-", color=f"C{k}", label=task)
            ax.set(title=f"tasks: {metric}", xlabel="step", ylabel=metric)
            ax.legend(fontsize="small")

    for ax in axes.flat:
        for i, step in enumerate(resume_steps(records)):
            ax.axvline(step, color="0.5", linestyle="--", linewidth=1, gid=RESUME, label="resumed" if i == 0 else None)
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle(title)
    return fig


def eval_series(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{task: {"acc": [(step, value), ...], "acc_norm": [...]}} from ``eval/<task>/<metric>`` records."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("eval/") and isinstance(value, (int, float)):
                task, _, metric = key[len("eval/"):].rpartition("/")
                if task and metric in ("acc", "acc_norm"):
                    out.setdefault(task, {}).setdefault(metric, []).append((r["step"], float(value)))
    return out
