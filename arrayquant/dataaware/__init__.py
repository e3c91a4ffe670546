"""Data-aware weight quantization: methods that use the statistics of a layer's inputs."""

from arrayquant.dataaware.gptq import GPTQ, gptq

__all__ = ["GPTQ", "gptq"]
