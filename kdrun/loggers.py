"""Metrics to local files (always) and to Weights & Biases (rank 0, when `logger=wandb`)."""

import json
import logging
import netrc
import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from kdrun.errors import KdrunError

log = logging.getLogger(__name__)


class RunLogger:
    """Appends one JSON object per event to `metrics.jsonl`; mirrors it to W&B when enabled."""

    def __init__(self, run_dir: str | Path | None, cfg: DictConfig | None = None, config: dict | None = None,
                 job_type: str | None = None):
        """`cfg`: the `logger` config; `job_type`: the W&B run's (`teacher`, `distill`, `train`)."""
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a") if self.path else None
        backend = cfg.get("backend") if cfg is not None else None
        self.wandb = _start_wandb(cfg, config, run_dir, job_type) if backend == "wandb" else None
        self.log_model = bool(cfg.get("log_model")) if cfg is not None else False
        self.tensorboard = None
        if backend == "tensorboard" and run_dir:
            from torch.utils.tensorboard import SummaryWriter  # pip install "kdrun[tensorboard]"

            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.tensorboard:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(name, value, step)

    def rewind(self, step: int) -> None:
        """Forget the rows after `step` (a resumed run trains those steps again)."""
        if self.path:
            rows = [line for line in _rows(self.path) if json.loads(line)["step"] <= step]
            self.file.close()
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(rows))
            tmp.replace(self.path)
            self.file = open(self.path, "a")
        if self.tensorboard:  # TensorBoard hides the events after `step` that an earlier session wrote
            log_dir = self.tensorboard.log_dir
            self.tensorboard.close()
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir, purge_step=step + 1)

    def checkpoint(self, path: Path) -> None:
        """Upload the run's best checkpoint (best.pt: weights and metadata, not last.pt's resume state) to W&B as
        a model artifact aliased `best` and `latest`, with `logger.log_model=true`."""
        if self.wandb and self.log_model:
            self.wandb.log_model(str(path), name=f"model-{self.wandb.id}", aliases=["best", "latest"])

    def log_teacher(self, path: Path, name: str) -> None:
        """The teacher kdrun trained (its checkpoint) as this run's output: the W&B model artifact `name`."""
        if self.wandb:
            self.wandb.log_artifact(str(path), name=name, type="model", aliases=["latest"])

    def use_teacher(self, path: Path, name: str) -> None:
        """The teacher's checkpoint as this run's input, for W&B's lineage: the artifact `name` with the same file
        (the same version as the teacher run's). W&B records artifact use online only; offline it is noted."""
        if not self.wandb:
            return
        if self.wandb.offline:
            log.info("W&B: offline, so the teacher (%s) is not linked as this run's input; its file is %s", name, path)
            return
        import wandb

        artifact = wandb.Artifact(name, type="model")
        artifact.add_file(str(path))
        self.wandb.use_artifact(artifact)

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
        if self.tensorboard:
            self.tensorboard.close()
            self.tensorboard = None


def _rows(path: Path) -> list[str]:
    """The lines of a metrics.jsonl, less a last line torn by a process killed while writing it (with a warning);
    any other line that is not a JSON row is one clear error."""
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        try:
            json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            if i < len(lines) - 1:
                raise KdrunError(f"line {i + 1} of {path} is not a row kdrun wrote; delete that line (or the run dir's "
                                 "metrics.jsonl, losing the curves so far) to continue the run") from None
            log.warning("%s: dropping its last line, cut off when the run was stopped (%r)", path, line[:60])
            return lines[:-1]
    return lines


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def wandb_server() -> tuple[str, int]:
    """The W&B server's host and port: `WANDB_BASE_URL` (a self-hosted server) or the public one."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _start_wandb(cfg: DictConfig, config: dict | None, run_dir, job_type: str | None = None):
    """Start a W&B run; online only with an API key and a reachable server (`WANDB_BASE_URL`'s), never a hang."""
    mode = cfg.mode
    if mode == "disabled":
        return None
    if mode == "online":
        host, port = wandb_server()
        reason = None if _has_api_key(host) else "no API key (run `wandb login` or set WANDB_API_KEY)"
        if reason is None and not _reachable(host, port):
            reason = f"{host}:{port} is unreachable"
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
        config=config, id=run_id, resume="allow" if run_id else None, reinit="finish_previous", job_type=job_type,
        settings=wandb.Settings(init_timeout=60, silent=True),
    )
    if mode == "online" and run.url:
        log.info("W&B: %s run %s", job_type or "the", run.url)
    return run


def plain_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
