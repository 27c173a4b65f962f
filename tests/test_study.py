"""The recipe study of a report: grid points grouped into variants, each at its best learning rate, the ratio of
LoRA's best learning rate to full fine-tuning's, and the three figures, on a hand-made selection."""

from __future__ import annotations

from qatune.compare.plots import draw_study_plots
from qatune.compare.study import lr_ratios, rank_family, study_lines, variants


def _point(method: str, lr: float, f1: float, loss: float, rank: int | None = None, **fixed) -> dict:
    point = {"train.lr": lr, **fixed} if rank is None else {"lora.r": rank, "train.lr": lr, **fixed}
    return {"name": f"{method}-{rank}-{lr}-{fixed}", "model": "m", "method": method, "rank": None, "point": point,
            "picked": False, "f1": f1, "val_loss": loss,
            "trainable_params": 1e8 if method == "full" else 1e4 * (rank or 8),
            "curve": [{"step": 10, "val_loss": loss + 0.5, "f1": f1 - 1}, {"step": 20, "val_loss": loss, "f1": f1}]}


def _results() -> dict:
    all_linear = {"lora.targets": ["all-linear"]}
    selection = [
        _point("full", 1e-4, 10.0, 2.0), _point("full", 3e-4, 12.0, 2.1), _point("full", 1e-3, 8.0, 2.4),
        _point("lora", 1e-3, 15.0, 1.9, 16, **all_linear), _point("lora", 3e-3, 20.0, 2.0, 16, **all_linear),
        _point("lora", 1e-2, 18.0, 2.2, 16, **all_linear),
        _point("lora", 1e-3, 11.0, 2.3, 1, **all_linear), _point("lora", 1e-3, 16.0, 1.95, 64, **all_linear),
        _point("lora", 1e-3, 13.0, 2.05, 16, **{"lora.targets": ["q", "v"]}),
    ]
    return {"select_metric": "f1", "selection": selection}


def test_variants_and_the_learning_rate_ratio_by_hand():
    found = variants(_results(), "m")
    assert [v.label for v in found] == ["full", "LoRA r=16 all-linear", "LoRA r=1 all-linear",
                                        "LoRA r=64 all-linear", "LoRA r=16 q+v"]
    assert [p["point"]["train.lr"] for p in found[1].points] == [1e-3, 3e-3, 1e-2]
    assert found[0].best("f1")["point"]["train.lr"] == 3e-4 and found[0].best("val_loss")["point"]["train.lr"] == 1e-4
    # by F1: LoRA's best 3e-3 over full's 3e-4; by loss: 1e-3 over 1e-4; variants with one lr have no ratio
    assert [(v.label, lr, round(ratio, 6)) for v, lr, ratio in lr_ratios(found, "f1")] == [
        ("LoRA r=16 all-linear", 3e-3, 10.0)]
    assert [(lr, round(ratio, 6)) for _, lr, ratio in lr_ratios(found, "val_loss")] == [(1e-3, 10.0)]
    assert [v.rank for v in rank_family(found)] == [1, 16, 64]


def test_study_table_and_figures(tmp_path):
    results = _results()
    text = "\n".join(study_lines(results, "m"))
    assert "| LoRA r=16 all-linear | 160K | 0.001, 0.003, 0.01 | 0.003 | 20 | 2 | 1.9 (0.001) |" in text
    assert "| full | 100.0M | 0.0001, 0.0003, 0.001 | 0.0003 | 12 | 2.1 | 2 (0.0001) |" in text
    assert "by validation f1: LoRA r=16 all-linear 0.003 (10x)" in text
    assert "by validation val_loss: LoRA r=16 all-linear 0.001 (10x)" in text
    names = draw_study_plots("m", results, "m", tmp_path)
    assert names == ["m-study-lr.png", "m-study-ranks.png", "m-study-params.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in names)
    assert study_lines({"select_metric": "f1", "selection": results["selection"][:1]}, "m") == []
    no_grid = [dict(p, point={}) for p in results["selection"][:4]]  # methods without a grid: nothing studied
    assert study_lines({"select_metric": "f1", "selection": no_grid}, "m") == []
