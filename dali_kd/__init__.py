"""dali_kd: knowledge distillation for vision models with the input pipeline on the GPU through NVIDIA DALI."""

__version__ = "0.1.0"
