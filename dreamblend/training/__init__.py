"""Fine-tuning that produces checkpoint trajectories for DreamBlend: DreamBooth and AttnDreamBooth."""

from dreamblend.training.attndreambooth import AttnDreamBoothConfig, train_attndreambooth
from dreamblend.training.dreambooth import DreamBoothConfig, train_dreambooth
from dreamblend.training.engine import TrainingResult
from dreamblend.training.errors import TrainingInputError
from dreamblend.training.regularizer import attention_map_regularizer
from dreamblend.training.schedule import paper_schedule, parse_save_at
from dreamblend.training.trajectory import CheckpointInfo, load_checkpoint, read_checkpoint, read_trajectory

__all__ = [
    "AttnDreamBoothConfig",
    "CheckpointInfo",
    "DreamBoothConfig",
    "TrainingInputError",
    "TrainingResult",
    "attention_map_regularizer",
    "load_checkpoint",
    "paper_schedule",
    "parse_save_at",
    "read_checkpoint",
    "read_trajectory",
    "train_attndreambooth",
    "train_dreambooth",
]
