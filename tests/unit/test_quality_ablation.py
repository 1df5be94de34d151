"""The ablation table of ``bench.quality_ablation``: one line per row, its seeds' figures as mean and range."""

from bench.quality_ablation import ROWS, row_lr, table


def _run(row: str, seed: int, iou: float, object_f1: float, load_after: float) -> dict:
    return {"row": row, "seed": seed, "iou": iou, "f1": 2 * iou / (1 + iou), "object_f1": object_f1, "steps": 250,
            "train_minutes": 3.0 + seed, "evaluate_minutes": 0.3, "load_before": 1.0 + seed, "load_after": load_after}


def test_seeds_of_a_row_give_one_line_with_mean_and_range():
    lines = table([_run("residual", 0, 0.58, 0.20, 2.0), _run("residual", 1, 0.56, 0.10, 2.5),
                   _run("depth 5", 0, 0.57, 0.19, 3.0)]).splitlines()
    assert len(lines) == 4  # header, rule, one line per row
    residual = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert residual[:3] == ["residual", "0,1", "0.570 (0.560-0.580)"]
    assert residual[4] == "0.150 (0.100-0.200)"
    assert residual[6:] == ["3.5", "0.3", "1.0 -> 2.5"]  # mean train minutes; load from the first run to the last
    depth = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert depth[:5] == ["depth 5", "0", "0.570", "0.726", "0.190"]  # one seed: the figure alone


def test_a_row_records_the_learning_rate_it_trains_at():
    rows = {name: flags for name, _, flags, _ in ROWS}
    assert row_lr(rows["split + residual blocks + lr 1e-2"], 3e-3) == 1e-2  # the row's own flag wins
    assert row_lr(rows["split + residual blocks"], 3e-3) == 3e-3  # no flag of its own: the bench's
