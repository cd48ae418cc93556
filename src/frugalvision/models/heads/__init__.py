"""Task heads on top of timm backbones (segmentation; detection and masks come with later features)."""

from .seg import MLPDecoder, SegmentationModel

__all__ = ["MLPDecoder", "SegmentationModel"]
