"""Finding and preparing a TFDS dataset: the builder by name, prepared offline (digits) or only when asked to
download, by process 0 alone on many hosts; the classes it declares."""

from __future__ import annotations

import contextlib
import io

import tensorflow_datasets as tfds

from jaxdiff.data.config import KNOWN_DATASETS, DataConfig
from jaxdiff.data.digits import Digits
from jaxdiff.errors import DataError, MissingFileError
from jaxdiff.logs import log, show_all
from jaxdiff.parallel import process_verdicts

__all__ = ["num_classes", "prepared_builder"]


def num_classes(config: DataConfig) -> int | None:
    """The number of classes the dataset declares (its ``label_key`` feature's ``ClassLabel.num_classes``), or None if
    it has no such feature. Read from the metadata, not from the labels seen: a split that happens to lack the last
    class still gets the right count."""
    features = prepared_builder(config).info.features
    feature = features[config.label_key] if config.label_key in features else None
    return int(feature.num_classes) if isinstance(feature, tfds.features.ClassLabel) else None


def _builder(config: DataConfig) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(config.dataset, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"Unknown dataset {config.dataset!r}: not a TFDS dataset. Use one of {', '.join(KNOWN_DATASETS)} or "
            "any TFDS image dataset name (see `tfds.list_builders()`)."
        ) from e


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """``builder.is_prepared()`` without its warning ("Variant folder ... has no dataset_info.json", logged whenever
    the answer is no): the version's folder (any file system TFDS reads) holds the metadata file TFDS writes last."""
    return (builder.data_path / "dataset_info.json").exists()


def _build_digits(builder: Digits) -> None:
    """Build the digits (offline, from scikit-learn's bundled copy, in ~2 s) with one line of ours instead of TFDS's
    messages and progress bars (:func:`jaxdiff.logs.show_all`: TFDS's own). TFDS's output is printed if the build
    fails."""
    log(f"Building the digits dataset (scikit-learn's 8x8 digits, offline) in {builder.data_dir}; once.")
    if show_all():
        builder.download_and_prepare()
        return
    captured = io.StringIO()
    bars = getattr(tfds.core.utils.tqdm_utils, "_active", True)  # the user's own setting, put back after
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(captured):
            builder.download_and_prepare()
    except BaseException:
        print(captured.getvalue(), end="")
        raise
    finally:
        tfds.display_progress_bar(bars)


def _prepare(builder: tfds.core.DatasetBuilder, config: DataConfig) -> None:
    """Build the dataset where it is not prepared: digits offline; others only with ``download``."""
    if _is_prepared(builder):
        return
    if isinstance(builder, Digits):
        _build_digits(builder)
    elif config.download:  # ArrayRecord: both readers can read it (TFRecord has no random access for streaming).
        builder.download_and_prepare(file_format=None if config.reader == "memory" else "array_record")
    else:
        raise MissingFileError(
            f"Dataset {config.dataset!r} is not prepared in {builder.data_dir}. Prepare it with "
            f"`tfds build {config.dataset} --data_dir={builder.data_dir_root}` on a machine with internet access "
            "(or copy the prepared folder there), or set config.data.download=True to let this run download it."
        )


def prepared_builder(config: DataConfig) -> tfds.core.DatasetBuilder:
    """The dataset's TFDS builder, prepared (digits offline; others only with ``download``), with an image feature.

    On several processes, process 0 prepares a dataset while the others wait (hosts that share the data directory
    must not build it side by side: the second one's final rename fails), and its failure is raised on every process
    (one that raised alone would leave the others waiting in their next collective); a host whose directory is its
    own then prepares its copy. Every process calls this alike (a run's and sample.py's code is the same on all).
    """
    import jax

    builder = _builder(config)
    if jax.process_count() > 1:
        failure = None
        if jax.process_index() == 0:
            try:
                _prepare(builder, config)
            except Exception as e:  # raised below, on every process
                failure = e
        if not process_verdicts(failure is None).all():  # the others wait here for process 0
            raise failure or DataError(f"Process 0 could not prepare {config.dataset!r}; its log says why.")
        builder = _builder(config)  # prepared by process 0 where the directory is shared
    _prepare(builder, config)
    if config.image_key not in builder.info.features:
        raise DataError(
            f"Dataset {config.dataset!r} has no feature {config.image_key!r}; it has {list(builder.info.features)}."
        )
    return builder
