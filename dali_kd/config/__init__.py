"""The typed config: its sections (dali_kd.config.data_section, train_section and model_section, on the base in
dali_kd.config.section), the whole config and its cross-section rules (dali_kd.config.schema), the shipped config
files (dali_kd.config.files), and loading from YAML files and overrides (dali_kd.config.loading)."""

from dali_kd.config.data_section import AugmentConfig, DataConfig
from dali_kd.config.files import CONFIG_DIR, DEMO_CONFIG_DIR, SECTION_FILES
from dali_kd.config.loading import dump_config, load_config, parse_override, read_yaml
from dali_kd.config.model_section import ModelConfig, ModelSpec, StudentSpec, TeacherSpec
from dali_kd.config.schema import Config, ConfigConflict, key_default, resume_free_keys
from dali_kd.config.section import Section, free_on_resume
from dali_kd.config.stream_settings import StreamSettings
from dali_kd.config.train_section import LossConfig, OptimizerConfig, TrainConfig

__all__ = [
    "CONFIG_DIR", "DEMO_CONFIG_DIR", "SECTION_FILES", "AugmentConfig", "Config", "ConfigConflict", "DataConfig",
    "LossConfig", "ModelConfig", "ModelSpec", "OptimizerConfig", "Section", "StreamSettings", "StudentSpec", "TeacherSpec", "TrainConfig",
    "dump_config", "free_on_resume", "key_default", "load_config", "parse_override", "read_yaml", "resume_free_keys",
]  # fmt: skip
