"""`kdrun-transfer ckpt_path=RUN/checkpoints/best.pt [transfer=PRESET]`: the transfer evaluation of any kdrun
checkpoint (a student's, a teacher's: its `arch` record rebuilds the model), as a run's `transfer=` does it
(kdrun/transfer.py): each task's probes in this command's output dir, `outputs/transfer/<date>/<time>/<task>/<protocol>/`,
the results in its transfer.json (the summary keys a run writes) and printed."""

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kdrun.tools import atomic, checkpoint_command

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="pkg://kdrun.conf", config_name="transfer_eval")
def main(cfg: DictConfig) -> None:
    """The `kdrun-transfer` command."""
    checkpoint_command("kdrun-transfer", cfg, transfer_checkpoint, format_report)


def transfer_checkpoint(cfg: DictConfig, out_dir: Path) -> dict:
    """Evaluate the features of the model in `cfg.ckpt_path` on `cfg.transfer`'s tasks; write transfer.json."""
    from kdrun import checkpoint, transfer
    from kdrun.errors import KdrunError
    from kdrun.run import resolve_device

    if not cfg.get("transfer"):
        raise KdrunError("no transfer evaluation chosen; name a preset with transfer=fashion_tops_digits (conf/transfer)")
    path = Path(cfg.ckpt_path).expanduser()
    tasks = transfer.prepare(cfg.transfer, str(cfg.paths.data_dir))
    model, ckpt = checkpoint.load_model(path)
    device = resolve_device(str(cfg.trainer.device))
    results = transfer.evaluate(model, cfg.transfer, tasks, out_dir, cfg.trainer, device, cfg.seed)
    report = {"ckpt_path": str(path), "model": ckpt["arch"].get("name") or ckpt["arch"].get("target"),
              "trained_on": ckpt["arch"].get("dataset"), **results}
    with atomic(out_dir / "transfer.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_report(report: dict, out_dir: Path) -> str:
    """The lines printed at the end: each task's accuracy per protocol, and where the files are."""
    rows = [f"kdrun-transfer {report['ckpt_path']} ({report['model']}, trained on {report['trained_on']})"]
    rows += [f"  {key[9:]:<28} {value:.4f}" for key, value in report.items() if key.startswith("transfer/")]
    rows.append(f"  output {out_dir} (transfer.json, <task>/<protocol>/metrics.jsonl)")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
