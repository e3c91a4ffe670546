"""Data-aware weight quantization: methods that use the statistics of a layer's inputs."""

from arrayquant.dataaware.gptq import GPTQ, gptq, gptq_codes

__all__ = ["GPTQ", "gptq", "gptq_codes"]
