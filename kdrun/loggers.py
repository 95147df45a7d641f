"""Metrics to local files (always) and to Weights & Biases (rank 0, when `logger=wandb`)."""

import json
import logging
import netrc
import os
import socket
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class RunLogger:
    """Appends one JSON object per event to `metrics.jsonl`; mirrors it to W&B when enabled."""

    def __init__(self, run_dir: str | Path | None, cfg: DictConfig | None = None, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a") if self.path else None
        self.wandb = _start_wandb(cfg, config, run_dir) if cfg is not None and cfg.get("backend") == "wandb" else None
        self.log_model = bool(cfg.get("log_model")) if cfg is not None else False

    def log(self, metrics: dict, step: int) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def rewind(self, step: int) -> None:
        """Forget the rows after `step` (a resumed run trains those steps again)."""
        if self.path:
            rows = [line for line in self.path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
            self.file.close()
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(rows))
            tmp.replace(self.path)
            self.file = open(self.path, "a")

    def checkpoint(self, path: Path) -> None:
        """Upload the final checkpoint to W&B as a model artifact, with `logger.log_model=true`."""
        if self.wandb and self.log_model:
            self.wandb.log_model(str(path), name=f"model-{self.wandb.id}")

    def image(self, name: str, path: Path) -> None:
        """An image file the run wrote (a plot), sent to W&B."""
        if self.wandb:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))})

    def summary(self, summary: dict) -> None:
        if self.path:
            _write_json(self.path.with_name("summary.json"), summary)
        if self.wandb:
            self.wandb.summary.update(summary)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.wandb:
            self.wandb.finish()
            self.wandb = None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _start_wandb(cfg: DictConfig, config: dict | None, run_dir):
    """Start a W&B run; online only with an API key and a reachable server, never a hang."""
    mode = cfg.mode
    if mode == "disabled":
        return None
    if mode == "online":
        reason = None if _has_api_key() else "no API key (run `wandb login` or set WANDB_API_KEY)"
        if reason is None and not _reachable("api.wandb.ai"):
            reason = "api.wandb.ai is unreachable"
        if reason:
            mode = "offline"
            log.warning("W&B: %s; logging offline under %s/wandb; upload later with `wandb sync %s/wandb/offline-run-*`",
                        reason, run_dir, run_dir)
    import wandb

    run_id = None
    if run_dir:  # a resumed run continues its W&B run
        id_file = Path(run_dir) / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])
        run_id = id_file.read_text().strip()
    run = wandb.init(
        project=cfg.project, entity=cfg.get("entity"), group=cfg.get("group"), name=cfg.get("name"),
        tags=[t[:64] for t in cfg.get("tags") or []], mode=mode, dir=str(run_dir) if run_dir else None,
        config=config, id=run_id, resume="allow" if run_id else None, reinit="finish_previous",
        settings=wandb.Settings(init_timeout=60, silent=True),
    )
    return run


def plain_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
