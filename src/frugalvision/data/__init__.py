"""Datasets, bundled real data and transforms."""

from .bundled import BUNDLED, build_bundled, cache_dir, load_bundled, source_images
from .folder import ImageFolderDataset
from .images import IMAGE_EXTENSIONS, load_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, data_config_of

__all__ = [
    "BUNDLED",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "build_bundled",
    "build_transforms",
    "cache_dir",
    "data_config_of",
    "load_bundled",
    "load_image",
    "source_images",
]
