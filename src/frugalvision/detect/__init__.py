"""Object detection: a YOLOv6 detector (training, fusion, export) and Mask Frozen instance masks on a frozen detector.

Example:
    >>> from frugalvision.detect import create_detector
    >>> create_detector("yolov6_test", num_classes=2).num_classes
    2
"""

from .yolov6 import VARIANTS, DetectorOutput, YOLOv6, create_detector, official_to_ours

__all__ = ["VARIANTS", "DetectorOutput", "YOLOv6", "create_detector", "official_to_ours"]
