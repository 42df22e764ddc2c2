"""``distllm plot``: every panel labelled, resumed runs marked at each resume step, downstream task curves and
bits per byte drawn when a run logged them."""

import json

import matplotlib
import pytest

from distllm.__main__ import main
from distllm.plot import RESUME, draw, eval_series, plot_run

matplotlib.use("Agg")


def synthetic_records(resumes=(10, 20)) -> list[dict]:
    """30 logged steps, validation every 10, a resume record after each step in ``resumes``."""
    records = []
    for step in range(1, 31):
        records.append({"step": step, "loss": 6 - 0.05 * step, "lr": 1e-3 * min(1, step / 5), "grad_norm": 0.5,
                        "tokens_per_s": 1000.0 + step, "mfu": 0.1})
        if step % 10 == 0:
            records.append({"step": step, "val_loss": 6 - 0.04 * step, "val_ppl": 100.0})
        if step in resumes:
            records.append({"step": step, "event": "resume", "checkpoint": f"run/checkpoints/step_{step:06d}"})
    return records


def markers(ax) -> list[float]:
    return sorted(float(line.get_xdata()[0]) for line in ax.get_lines() if line.get_gid() == RESUME)


def test_resumes_are_marked_in_every_panel_and_every_panel_is_labelled(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
    path, resumes = plot_run(str(tmp_path))
    assert resumes == [10, 20]
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {path} (resumed at step 10, 20)\n"

    fig = draw(synthetic_records(), "run")
    panels = fig.axes[:4]  # the fifth is the throughput panel's MFU axis, which shares its x axis
    assert [ax.get_title() for ax in panels] == ["loss", "validation perplexity", "learning rate", "throughput"]
    assert all(markers(ax) == [10, 20] for ax in panels)
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert panels[2].get_ylabel() == "learning rate"


def test_a_run_never_resumed_has_no_marker(tmp_path):
    fig = draw(synthetic_records(resumes=()), "run")
    assert all(markers(ax) == [] for ax in fig.axes)


def test_no_records_yet(tmp_path):
    from distllm.errors import DataError

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "event": "resume", "checkpoint": "x"}) + "\n")
    with pytest.raises(DataError, match="has no training or validation records yet"):
        plot_run(str(tmp_path))


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
    out, _ = plot_run(str(tmp_path))
    assert out.stat().st_size > 10_000
    import matplotlib.image

    height, width = matplotlib.image.imread(out).shape[:2]
    assert height > width * 0.9  # three rows of plots: the task row is there
