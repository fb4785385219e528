"""imgindex: find similar images with AugNet vectors, a FAISS index and SQLite metadata.

Drop-in for imgsim::

    import imgindex as imgsim
    vtr = imgsim.Vectorizer()
    dist = imgsim.distance(vtr.vectorize(img0), vtr.vectorize(img1))

Search a collection::

    with imgindex.Index.open("photos.idx", create=True) as index:
        index.add(["photos/"])
        hits = index.search("query.jpg", k=5)
"""

from imgindex.catalog import ImageRecord
from imgindex.duplicates import DuplicateGroup
from imgindex.errors import (
    ImageError,
    ImgIndexError,
    IncompatibleIndexError,
    IndexExistsError,
    IndexLockedError,
    IndexNotFoundError,
    WeightsError,
)
from imgindex.index import Index, default_index_path
from imgindex.ingest import BuildReport, Skipped
from imgindex.model import Vectorizer
from imgindex.photofacts import PhotoFacts
from imgindex.photos import PhotoFilter
from imgindex.search import Hit, cosine_similarity, distance
from imgindex.store import CheckReport

__version__ = "0.1.0"

__all__ = [
    "BuildReport",
    "CheckReport",
    "DuplicateGroup",
    "Hit",
    "ImageError",
    "ImageRecord",
    "ImgIndexError",
    "IncompatibleIndexError",
    "Index",
    "IndexExistsError",
    "IndexLockedError",
    "IndexNotFoundError",
    "PhotoFacts",
    "PhotoFilter",
    "Skipped",
    "Vectorizer",
    "WeightsError",
    "__version__",
    "cosine_similarity",
    "default_index_path",
    "distance",
]
