"""``distllm plot`` draws the downstream task curves and bits per byte a run logged."""

import json

from distllm.plot import eval_series, plot_run


def test_plot_draws_task_curves_from_metrics_jsonl(tmp_path):
    records = [{"step": s, "loss": 5.0 - s / 100, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e3, "mfu": 0.1}
               for s in (10, 20)]
    records += [{"step": s, "val_loss": 4.0, "val_ppl": 54.6, "val_bpb": 1.5} for s in (0, 20)]
    records += [{"step": s, "eval/piqa/acc": 0.5 + s / 100, "eval/piqa/acc_norm": 0.6, "eval/piqa/acc_stderr": 0.01,
                 "eval/arc/easy/acc_norm": 0.3} for s in (0, 20)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    series = eval_series(records)
    assert series == {"piqa": {"acc": [(0, 0.5), (20, 0.7)], "acc_norm": [(0, 0.6), (20, 0.6)]},
                      "arc/easy": {"acc_norm": [(0, 0.3), (20, 0.3)]}}  # stderr records are not curves
    out = plot_run(str(tmp_path))
    assert out.stat().st_size > 10_000
    import matplotlib.image

    height, width = matplotlib.image.imread(out).shape[:2]
    assert height > width * 0.9  # three rows of plots: the task row is there
