"""The typed config: sections (dali_kd.config.sections), the whole config and its cross-section rules
(dali_kd.config.schema), and loading from YAML files and overrides (dali_kd.config.loading)."""

from dali_kd.config.loading import dump_config, load_config, parse_override, read_yaml
from dali_kd.config.schema import Config, ConfigConflict, key_default, resume_free_keys
from dali_kd.config.sections import (
    CONFIG_DIR,
    DEMO_CONFIG_DIR,
    SECTION_FILES,
    AugmentConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    ModelSpec,
    OptimizerConfig,
    Section,
    StudentSpec,
    TeacherSpec,
    TrainConfig,
    free_on_resume,
)
from dali_kd.config.stream_settings import StreamSettings

__all__ = [
    "CONFIG_DIR", "DEMO_CONFIG_DIR", "SECTION_FILES", "AugmentConfig", "Config", "ConfigConflict", "DataConfig",
    "LossConfig", "ModelConfig", "ModelSpec", "OptimizerConfig", "Section", "StreamSettings", "StudentSpec", "TeacherSpec", "TrainConfig",
    "dump_config", "free_on_resume", "key_default", "load_config", "parse_override", "read_yaml", "resume_free_keys",
]  # fmt: skip
