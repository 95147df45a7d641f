"""The `kdrun` command: Hydra composes the config, `kdrun.run` does the work."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://kdrun.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from kdrun.errors import KdrunError  # heavy imports after Hydra has handled --help / --cfg
    from kdrun.run import format_summary, run

    hc = HydraConfig.get()
    try:
        summary = run(cfg, hc.runtime.output_dir, method_name=hc.runtime.choices.get("method"))
    except KdrunError as e:
        print(f"kdrun: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_summary(summary, hc.runtime.output_dir))
    return summary["test/acc"]
