"""`kdrun-eval ckpt_path=RUN/checkpoints/best.pt [dataset=NAME] [split=test|val]`: a checkpoint's top-1 and top-5
accuracy, per-class accuracy and confusion matrix, written to this command's own output dir (eval.json,
confusion.json, confusion.png). The dataset defaults to the run's own, read from the run dir's .hydra/config.yaml."""

import json
import logging
from importlib.resources import files
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from kdrun.tools import atomic, checkpoint_command

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="pkg://kdrun.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """The `kdrun-eval` command."""
    checkpoint_command("kdrun-eval", cfg, evaluate_checkpoint, format_report)


def evaluate_checkpoint(cfg: DictConfig, out_dir: Path) -> dict:
    """Evaluate `cfg.ckpt_path` on `cfg.dataset` (else its run's dataset) and write the report to `out_dir`."""
    from kdrun import checkpoint, data as kdata
    from kdrun.evaluation import evaluate
    from kdrun.run import resolve_device

    path = Path(cfg.ckpt_path).expanduser()
    model, ckpt = checkpoint.load_model(path)
    arch = ckpt["arch"]
    with open_dict(cfg):  # the run's dataset config, its ${paths...} resolved against this command's paths
        cfg.dataset = cfg.get("dataset") or run_dataset(path, arch)
    data = kdata.build(cfg.dataset)
    _check_fits(arch, data, path)
    device = resolve_device(str(cfg.trainer.device))
    loaders = kdata.Loaders(data, kdata.BatchSpec(), cfg.trainer.eval_batch_size, cfg.trainer.eval_batch_size,
                            device, seed=0)
    result = evaluate(model.to(device), loaders.evaluation(kdata.EvalSet(cfg.split, cfg.split)), detail=True)
    confusion = result["confusion"]
    names = [str(c) for c in (getattr(data.splits.test, "classes", None) or range(data.num_classes))]
    report = {
        "ckpt_path": str(path), "dataset": data.name, "split": cfg.split, "images": sum(map(sum, confusion)),
        "top1": result["acc"], "top5": result["top5"], "loss": result["loss"],
        "per_class_acc": {name: row[i] / sum(row) if sum(row) else None
                          for i, (name, row) in enumerate(zip(names, confusion))},
    }
    for name, obj in (("eval.json", report), ("confusion.json", {"classes": names, "matrix": confusion})):
        with atomic(out_dir / name) as tmp:
            tmp.write_text(json.dumps(obj, indent=1) + "\n")
    plot_confusion(confusion, names, f"{path.parent.parent.name}/{path.name} on {data.name} {cfg.split}",
                   out_dir / "confusion.png")
    return report


def run_dataset(path: Path, arch: dict) -> DictConfig:
    """The dataset config of the run whose checkpoints/ holds `path`; else the dataset preset the checkpoint's
    `arch` names."""
    run_config = path.parent.parent / ".hydra" / "config.yaml"
    if run_config.is_file():
        return OmegaConf.load(run_config).dataset
    preset = files("kdrun.conf") / "dataset" / f"{arch.get('dataset')}.yaml"
    if preset.is_file():
        return OmegaConf.load(preset)
    from kdrun.errors import KdrunError

    raise KdrunError(f"{path} is not in a run dir (no {run_config}) and its dataset '{arch.get('dataset')}' is not a "
                     "dataset preset; name the dataset to evaluate on with dataset=NAME")


def _check_fits(arch: dict, data, path: Path) -> None:
    from kdrun.errors import KdrunError

    names = getattr(data.splits.test, "classes", None)
    other_names = arch.get("classes") is not None and names is not None and list(names) != arch["classes"]
    if arch["num_classes"] != data.num_classes or other_names:
        has = "other classes" if other_names else f"{data.num_classes} classes"
        raise KdrunError(f"the checkpoint {path} predicts the {arch['num_classes']} classes of {arch.get('dataset')} "
                         f"but {data.name} has {has}; evaluate it on a dataset with the classes it was trained on "
                         f"(dataset={arch.get('dataset')})")
    if arch["in_chans"] != data.in_chans:
        raise KdrunError(f"the checkpoint {path} takes {arch['in_chans']}-channel images but {data.name} has "
                         f"{data.in_chans} channels; evaluate it on a dataset with {arch['in_chans']}-channel images")


def plot_confusion(confusion: list[list[int]], names: list[str], title: str, path: Path) -> None:
    """The confusion matrix as a PNG (rows: true class, columns: predicted; each row as fractions of its class)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed, so there is no confusion.png: pip install 'kdrun[plot]'")
        return
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(names)
    size = min(4 + 0.35 * n, 20)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 2 else 0)
        ax.set_yticks(range(n), names)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def format_report(report: dict, out_dir: Path) -> str:
    """The lines printed at the end: accuracy, the least accurate classes, where the files are."""
    worst = sorted((acc, name) for name, acc in report["per_class_acc"].items() if acc is not None)[:5]
    return "\n".join([
        f"kdrun-eval {report['ckpt_path']} on {report['dataset']} {report['split']} ({report['images']} images)",
        f"  top-1 {report['top1']:.4f}   top-5 {report['top5']:.4f}   loss {report['loss']:.4f}",
        "  least accurate classes: " + ", ".join(f"{name} {acc:.3f}" for acc, name in worst),
        f"  output {out_dir} (eval.json, confusion.json, confusion.png)",
    ])


if __name__ == "__main__":
    main()
