"""Datasets, bundled real data and transforms."""

from .bundled import BUNDLED, build_bundled, cache_dir, load_bundled, source_images
from .detection import (
    BoxSample,
    BoxSet,
    DetectionDataset,
    detection_collate,
    load_coco,
    load_deepforest,
    load_voc,
    load_yolo,
    split_by_region,
    tile_boxset,
    tile_windows,
    to_original,
    write_coco,
)
from .folder import ImageFolderDataset
from .images import IMAGE_EXTENSIONS, load_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, data_config_of

__all__ = [
    "BUNDLED",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "BoxSample",
    "BoxSet",
    "DetectionDataset",
    "ImageFolderDataset",
    "build_bundled",
    "build_transforms",
    "cache_dir",
    "data_config_of",
    "detection_collate",
    "load_bundled",
    "load_coco",
    "load_deepforest",
    "load_image",
    "load_voc",
    "load_yolo",
    "source_images",
    "split_by_region",
    "tile_boxset",
    "tile_windows",
    "to_original",
    "write_coco",
]
