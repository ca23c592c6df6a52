"""The model: config dataclasses, the Transformer and its TopK bottlenecks."""

from saeformer.model.bottleneck import AuxRequest, Bottleneck, SiteOutput, TopKMLP
from saeformer.model.config import BottleneckConfig, ModelConfig
from saeformer.model.transformer import Output, Transformer

__all__ = [
    "AuxRequest",
    "Bottleneck",
    "BottleneckConfig",
    "ModelConfig",
    "Output",
    "SiteOutput",
    "TopKMLP",
    "Transformer",
]
