"""kdrun: a Hydra-driven experiment runner for knowledge distillation in computer vision."""

__version__ = "0.1.0"
