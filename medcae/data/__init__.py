"""Image decoding, data set loading and listing for medcae.

Data sets come from MedMNIST-style ``.npz`` files (by path or by name), folders of images
(one sub-folder per class, optionally under ``train/ val/ test/``), CSV files of
``path,label[,split]`` rows, ``.parquet`` files with encoded image bytes, or the built-in
synthetic demo data set (generated offline). Unlabeled images may also be given as a glob.

Modules, from the lowest floor up (each imports only modules above it in this list):

- ``decode``: errors, ``read_header`` and ``decode_image`` (Pillow and DICOM, size-limited
  before decoding), ``encode_png``.
- ``dataset``: ``ImageSet``, ``Dataset``, ``to_uniform``; ``splits``: the 70/15/15 split.
- ``listing``: a source listed but not decoded, and decoding it.
- ``medmnist``, ``npz``, ``demo``, ``folders``, ``tables``: one concern or format each.
- ``sources``: resolving a path, name or glob; ``load`` and ``rows``: the public entry points.

The package imports only NumPy, Pillow and the standard library at import time; pydicom and
pyarrow are imported lazily where they are needed. It never imports Ray.
"""

from medcae.data.dataset import DEFAULT_SIZE, SPLITS, Dataset, ImageSet, to_uniform
from medcae.data.decode import (
    MAX_DECODED_BYTES,
    MAX_PIXELS,
    DataError,
    ImageDecodeError,
    ImageHeader,
    ImageTooLargeError,
    NonFinitePixelsError,
    NoPixelDataError,
    decode_image,
    encode_png,
    read_header,
)
from medcae.data.demo import DEMO_NAME, make_demo_dataset
from medcae.data.folders import IMAGE_SUFFIXES
from medcae.data.load import load_dataset, load_unlabeled
from medcae.data.medmnist import MEDMNIST, MEDMNIST_URL, download_file
from medcae.data.rows import Rows, list_rows, list_unlabeled_rows

__all__ = [
    "DEFAULT_SIZE",
    "DEMO_NAME",
    "IMAGE_SUFFIXES",
    "MAX_DECODED_BYTES",
    "MAX_PIXELS",
    "MEDMNIST",
    "MEDMNIST_URL",
    "SPLITS",
    "DataError",
    "Dataset",
    "ImageDecodeError",
    "ImageHeader",
    "ImageSet",
    "ImageTooLargeError",
    "NonFinitePixelsError",
    "NoPixelDataError",
    "Rows",
    "decode_image",
    "download_file",
    "encode_png",
    "list_rows",
    "list_unlabeled_rows",
    "load_dataset",
    "load_unlabeled",
    "make_demo_dataset",
    "read_header",
    "to_uniform",
]
