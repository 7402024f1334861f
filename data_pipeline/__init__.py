"""The input pipeline: ImageFolder listing, packed data sets, pre-training scan, DALI feeds, demo data, PCA eigen.

``import data_pipeline`` does not import DALI: the feeds load it when they are built
and raise :class:`DataError` with the fix when it is missing.
"""

from data_pipeline.demo import ensure_demo_dataset
from data_pipeline.errors import DataError
from data_pipeline.feeds import SyntheticFeed, TrainFeed, ValFeed
from data_pipeline.folder import ImageList, list_images
from data_pipeline.eigen import load_eigen
from data_pipeline.packed import PackedImages, open_images
from data_pipeline.scan import scan_and_filter

__all__ = ["DataError", "ImageList", "PackedImages", "SyntheticFeed", "TrainFeed", "ValFeed", "ensure_demo_dataset",
           "list_images", "load_eigen", "open_images", "scan_and_filter"]
