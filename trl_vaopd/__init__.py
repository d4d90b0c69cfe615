"""Visual-Advantage On-Policy Distillation (VA-OPD) for vision-language models, on top of TRL."""

__version__ = "0.1.0"

from .config import VAOPDConfig
from .trainer import VAOPDTrainer


__all__ = ["VAOPDConfig", "VAOPDTrainer", "__version__"]
