"""TFDS builders `coco_instances` (a local COCO folder) and `shapes` (synthetic), read without TF.

Both write `array_record` files and are read with random access through
`builder.as_data_source(split)`; neither building nor reading imports TensorFlow. Images are
`tfds.features.Image` fed with already encoded bytes (TFDS stores bytes as given and decodes with
PIL on read; only encoding a NumPy image would need TF). The category table
`[{'id', 'name', 'label'}]` is stored in the builder's metadata (`metadata.json` next to the
data) so evaluation can map contiguous labels back to category ids and names.

`coco_instances` is keyed by its source: each COCO folder (its real path, and the name, size and
modification time of its annotation files) is built into a data set of its own under
`data_dir/coco_instances/<folder name>_<fingerprint>/` (`coco_config`), so another folder, or
edited annotations, never read the data built from an earlier one. Without `manual_dir` the one
data set built under `data_dir` is read, and several are an error naming their folders.

`coco_instances` is tolerant by default: defective images / annotations
(`coco_defects.DEFECT_KINDS`) are skipped, and the build logs a summary per split (counts per
kind, the first ids of each) that is also stored in the metadata:
`info.metadata['defects'][split]`, see `defects(source)`. `strict=True` (`load`, `builder`)
raises `coco_defects.CocoFormatError` at the first defect instead.

Records: see `coco.RECORD_FIELDS`. Entry points: `load(...)`, `categories(source)`,
`defects(source)`, `coco_ground_truth(source)`.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
from typing import Optional, Union

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from maskrcnn_jax.data import coco, coco_defects, shapes
from maskrcnn_jax.errors import InputError, UsageError

# TFDS derives a builder's code path through `importlib_resources` (not installed) for classes in
# packages; both builders live here and have no checksums or metadata files beside them.
_CODE_PATH = epath.Path(__file__)

_DESCRIPTION = "Instance segmentation records for maskrcnn_jax (see maskrcnn_jax/data/coco.py)."


def record_features() -> tfds.features.FeaturesDict:
    """The TFDS features of a record (`coco.RECORD_FIELDS`), shared by both builders."""
    t = tfds.features.Tensor
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        "image_id": t(shape=(), dtype=np.int64),
        "original_size": t(shape=(2,), dtype=np.int32),
        "file_name": tfds.features.Text(),
        "boxes": t(shape=(None, 4), dtype=np.float32),
        "labels": t(shape=(None,), dtype=np.int32),
        "category_ids": t(shape=(None,), dtype=np.int64),
        "is_crowd": t(shape=(None,), dtype=np.bool_),
        "areas": t(shape=(None,), dtype=np.float32),
        "annotation_ids": t(shape=(None,), dtype=np.int64),
        "mask_rles": tfds.features.Sequence(tfds.features.Text()),
        "no_annotations": t(shape=(), dtype=np.bool_),
    })


@dataclasses.dataclass
class CocoConfig(tfds.core.BuilderConfig):
    """The COCO folder a `coco_instances` data set is built from (`coco_config`)."""

    manual_dir: str = ""
    annotation_files: tuple = ()  # ((path relative to manual_dir, size, mtime_ns), ...)


def coco_config(manual_dir: str) -> CocoConfig:
    """The builder config of a COCO folder, named `<folder name>_<fingerprint>`: the
    fingerprint hashes the folder's real path and the name, size and modification time of each
    `annotations/instances_*.json`, so that another folder or changed annotations build their
    own data set.

    Raises:
      UsageError: `manual_dir` is not a folder. CocoFormatError: it has no annotation files.
    """
    folder = os.path.realpath(os.path.expanduser(manual_dir))
    if not os.path.isdir(folder):
        raise UsageError(f"manual_dir {manual_dir}: no such folder (the COCO folder of "
                         "coco_instances)")
    stamps = []
    for annotation_file, _ in sorted(coco.find_annotation_files(folder).values()):
        stat = os.stat(annotation_file)
        stamps.append((os.path.relpath(annotation_file, folder), stat.st_size, stat.st_mtime_ns))
    digest = hashlib.sha256(json.dumps([folder, stamps]).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(folder)).strip("_")[:40] or "coco"
    return CocoConfig(name=f"{slug}_{digest}", description=f"the COCO folder {folder}",
                      manual_dir=folder, annotation_files=tuple(stamps))


def built_coco_sets(data_dir: str) -> dict[str, str]:
    """`{config name: source COCO folder}` of the `coco_instances` data sets built under
    `data_dir` (the folder as recorded when it was built)."""
    root = os.path.join(os.path.expanduser(data_dir), CocoInstances.name)
    found = {}
    for name in sorted(os.listdir(root) if os.path.isdir(root) else []):
        version = os.path.join(root, name, str(CocoInstances.VERSION))
        if os.path.exists(os.path.join(version, "dataset_info.json")):
            try:
                with open(os.path.join(version, "metadata.json")) as f:
                    found[name] = json.load(f)["source"]["manual_dir"]
            except (OSError, KeyError, TypeError, ValueError):
                found[name] = "(unknown folder)"
    return found


class CocoInstances(tfds.core.GeneratorBasedBuilder):
    """A local COCO-format folder (`manual_dir`), one split per `annotations/instances_*.json`
    (`train*` -> 'train', `val*` -> 'validation'). Nothing is downloaded. One data set per
    folder and annotation files (`coco_config`)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = _CODE_PATH
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass manual_dir: a folder with annotations/instances_<split>.json and the images of "
        "each annotation file in <split>/ (e.g. annotations/instances_val2017.json, val2017/).")

    def __init__(self, *, strict: bool = False, **kwargs):
        """`strict`: building raises `coco_defects.CocoFormatError` at the first defect instead
        of skipping and counting it (it does not change a data set built already)."""
        self.strict = bool(strict)
        super().__init__(**kwargs)
        self._original_state["strict"] = self.strict  # pickling re-runs __init__ with these

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=_DESCRIPTION,
                                     features=record_features(),
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        splits = coco.find_annotation_files(os.fspath(dl_manager.manual_dir))
        categories = coco.merge_categories(
            [coco.load_annotation_file(ann)["categories"] for ann, _ in splits.values()],
            os.fspath(dl_manager.manual_dir))
        self.info.metadata["categories"] = categories
        self.info.metadata["defects"] = {}
        self.info.metadata["source"] = {
            "manual_dir": os.fspath(dl_manager.manual_dir),
            "annotation_files": [list(a) for a in self.builder_config.annotation_files]}
        return {name: self._generate_examples(name, ann, images, categories)
                for name, (ann, images) in splits.items()}

    def _generate_examples(self, split, annotation_file, image_dir, categories):
        log = coco_defects.DefectLog(strict=self.strict)
        yield from coco.coco_records(annotation_file, image_dir, categories, log)
        # Filled when the split's generator is exhausted, before TFDS writes metadata.json.
        summary = log.summary()
        self.info.metadata["defects"][split] = summary
        text = coco_defects.format_defect_summary(f"{self.name}/{split} ({annotation_file})",
                                                  summary)
        (logging.warning if summary["kinds"] else logging.info)("%s", text)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Sizes and seed of the synthetic set; the config name should encode them (one directory
    per config). `shapes_config(...)` makes one with such a name."""

    num_train: int = 2000
    num_validation: int = 200
    seed: int = 0
    options: shapes.ShapesOptions = dataclasses.field(default_factory=shapes.ShapesOptions)


def shapes_config(num_train: int = 2000, num_validation: int = 200, seed: int = 0,
                  **options) -> ShapesConfig:
    """A `ShapesConfig` named after its settings (`options`: `shapes.ShapesOptions` fields)."""
    opts = shapes.ShapesOptions(**options)
    name = f"n{num_train}_{num_validation}_seed{seed}"
    if opts != shapes.ShapesOptions():
        name += "_" + "_".join(f"{k}{v}" for k, v in sorted(dataclasses.asdict(opts).items()))
    return ShapesConfig(name=name.replace(".", "p"), num_train=num_train,
                        num_validation=num_validation, seed=seed, options=opts)


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic overlapping shapes (`shapes.py`), generated locally and deterministically."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = _CODE_PATH
    BUILDER_CONFIGS = [shapes_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        categories = shapes.CATEGORIES[:self.builder_config.options.num_classes]
        return tfds.core.DatasetInfo(builder=self, description=_DESCRIPTION,
                                     features=record_features(),
                                     metadata=tfds.core.MetadataDict(categories=categories))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train),
                "validation": self._generate_examples("validation", c.num_validation)}

    def _generate_examples(self, split, num_images):
        c = self.builder_config
        step = max(num_images // 10, 1)
        for key, record in shapes.shapes_records(c.seed, split, num_images, c.options):
            if int(key) % step == 0:
                print(f"shapes/{split}: generating image {int(key) + 1}/{num_images}", flush=True)
            yield key, record


BUILDERS = {"coco_instances": CocoInstances, "shapes": Shapes}


def builder(name: str, data_dir: str,
            config: Optional[Union[str, tfds.core.BuilderConfig]] = None, strict: bool = False,
            manual_dir: Optional[str] = None):
    """The builder `name` ('coco_instances' or 'shapes') over `data_dir` (not built yet).

    coco_instances: its config is `coco_config(manual_dir)`; without `manual_dir`, the one data
    set built under `data_dir` (a UsageError when there is none or several). `strict` (shapes
    has no defects to find): building raises `coco_defects.CocoFormatError` at the first defect
    instead of skipping it.
    """
    if name not in BUILDERS:
        raise UsageError(f"unknown data set {name!r}; known: {sorted(BUILDERS)}")
    kwargs = {"config": config} if config is not None else {}
    if name == "coco_instances":
        kwargs["strict"] = strict
        if config is None:
            kwargs["config"] = (coco_config(manual_dir) if manual_dir
                                else _the_built_coco_set(data_dir))
    try:
        return BUILDERS[name](data_dir=data_dir, file_format="array_record", **kwargs)
    except ValueError as e:  # TFDS: an unknown builder config name
        if isinstance(config, str):
            raise UsageError(f"{name} has no builder config {config!r} ("
                             f"{str(e).splitlines()[0]})") from None
        raise


def load(name: str, data_dir: str, split: str, manual_dir: Optional[str] = None,
         config: Optional[Union[str, tfds.core.BuilderConfig]] = None, strict: bool = False):
    """Build `name` under `data_dir` if needed; the random-access data source of `split`.

    Args:
      name: 'shapes' or 'coco_instances'.
      data_dir: where TFDS keeps the built data.
      split: e.g. 'train', 'validation' (TFDS slicing such as 'train[:10]' works).
      manual_dir: the COCO folder (coco_instances only): each folder (and version of its
        annotation files) is built into its own data set under `data_dir`; None reads the one
        built there (a UsageError when there is none or several).
      config: a builder config (e.g. `shapes_config(num_train=100)`) or its name.
      strict: coco_instances: building raises `coco_defects.CocoFormatError` at the first
        defect (naming the file, the image / annotation id and the field) instead of skipping
        defective images / annotations; a data set built earlier with defects raises too.

    Returns:
      A TFDS `ArrayRecordDataSource`: `len()`, `source[i]` -> record dict (image decoded to a
      `(H, W, 3)` uint8 array), `source.dataset_info.metadata['categories']` (and, for
      coco_instances, `['defects']`: see `defects`, and `['source']`: the folder).

    Raises:
      UsageError: an unknown data set or split (naming the splits there), no such
        `manual_dir`. InputError: a split selection without records.
    """
    b = builder(name, data_dir, config, strict=strict, manual_dir=manual_dir)
    if not b.is_prepared():
        # One builder at a time per data_dir: the processes of a multi-process run (or two
        # runs) that find the data missing wait for the first to build it, then read it.
        with _exclusive(os.path.join(os.path.expanduser(data_dir), f".{name}.lock")):
            b = builder(name, data_dir, b.builder_config, strict=strict)
            if not b.is_prepared():
                logging.info("building %s into %s", b.name, b.data_dir)
                b.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    manual_dir=getattr(b.builder_config, "manual_dir", None) or manual_dir))
    elif strict and name == "coco_instances":
        found = {s: d for s, d in (b.info.metadata.get("defects") or {}).items() if d["kinds"]}
        if found:
            raise coco_defects.CocoFormatError(
                f"{b.data_dir}: built earlier (tolerant) with defects; delete it to rebuild "
                "strictly:\n" + "\n".join(coco_defects.format_defect_summary(s, d)
                                          for s, d in found.items()))
    try:
        return b.as_data_source(split=split)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise UsageError(f"split {split!r}: the {name} data set in {b.data_dir} has the "
                             f"splits {sorted(b.info.splits.keys())}") from None
        raise InputError(f"split {split!r} of {b.data_dir} cannot be read (no records "
                         f"selected?): {e}") from None


def _the_built_coco_set(data_dir: str) -> CocoConfig:
    """The config of the one coco_instances data set built under `data_dir`."""
    built = built_coco_sets(data_dir)
    if len(built) != 1:
        listed = "; ".join(f"{folder} ({name})" for name, folder in built.items())
        raise UsageError(
            "coco_instances needs manual_dir (the COCO folder): "
            + (f"{data_dir} holds data sets built from several folders: {listed}" if built
               else f"no coco_instances data set is built under {data_dir} yet"))
    (name, folder), = built.items()
    logging.info("coco_instances: no manual_dir given, reading the data set built from %s",
                 folder)
    return CocoConfig(name=name, description=f"the COCO folder {folder}", manual_dir=folder)


@contextlib.contextmanager
def _exclusive(lock_path: str):
    """Holds an exclusive `flock` on `lock_path` (created) for the duration."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def defects(source) -> dict:
    """`{split: summary}` of a coco_instances data source (`coco_defects.DefectLog.summary()`:
    kept / total images and annotations, `kinds: {kind: {'count', 'ids'}}`); `{}` for shapes."""
    return {s: dict(d) for s, d in (source.dataset_info.metadata.get("defects") or {}).items()}


def categories(source) -> list[dict]:
    """`[{'id', 'name', 'label'}]` (label = contiguous 1..K) stored with a data source."""
    return [dict(c) for c in source.dataset_info.metadata["categories"]]


def coco_ground_truth(source, use_labels: bool = False):
    """A pycocotools `COCO` ground truth of a data source (a split), masks as RLE.

    Args:
      source: from `load(...)`; its images are not decoded (only annotations are read).
      use_labels: category ids are the contiguous labels 1..K instead of the original ids.
    """
    from pycocotools.coco import COCO

    reader = _annotation_reader(source)
    dataset = coco.ground_truth_dataset((reader[i] for i in range(len(reader))),
                                        categories(source), use_labels)
    gt = COCO()
    gt.dataset = dataset
    gt.createIndex()
    return gt


def image_ids_and_sizes(source, num_records: Optional[int] = None):
    """`(image_ids (N,) int64, sizes (N, 2) int64 (height, width))` of the first
    `num_records` records (default all), read without decoding their images (what canvas
    buckets are planned from)."""
    reader = _annotation_reader(source)
    n = len(reader) if num_records is None else int(num_records)
    records = [reader[i] for i in range(n)]
    ids = np.asarray([r["image_id"] for r in records], np.int64).reshape(n)
    return ids, np.asarray([r["original_size"] for r in records], np.int64).reshape(n, 2)


def _annotation_reader(source):
    """The same records without decoding images (reading annotations of a whole split)."""
    try:
        return dataclasses.replace(source, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception:  # pragma: no cover - older TFDS data sources: decode images too
        return source
