"""Task heads on top of timm backbones (segmentation; detection and masks come with later features)."""

from .seg import MLPDecoder, SegmentationModel, build_segmentation_model

__all__ = ["MLPDecoder", "SegmentationModel", "build_segmentation_model"]
