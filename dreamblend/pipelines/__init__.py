"""DreamBlend pipelines for SD1.x/2.x and SDXL, and what they share."""

from dreamblend.pipelines.blend import DreamBlendPipelineOutput
from dreamblend.pipelines.pipeline_dreamblend import DreamBlendPipeline
from dreamblend.pipelines.pipeline_dreamblend_xl import DreamBlendXLPipeline

__all__ = ["DreamBlendPipeline", "DreamBlendPipelineOutput", "DreamBlendXLPipeline"]
