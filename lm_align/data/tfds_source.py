"""TFDS datasets as sources: ``tfds:NAME[:VERSION]``, read without TensorFlow.

The dataset must already be prepared in ``array_record`` format under
``data_cfg.tfds_data_dir`` (``None`` = tfds's default, ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``); it is opened with ``builder.as_data_source`` (what
``tfds.data_source`` does), a random-access source that grain shuffles, shards
and checkpoints like any other. Nothing is downloaded: an unprepared dataset
is an error that says how to prepare it offline::

  builder = MyDataset(data_dir=DIR, file_format="array_record")
  builder.download_and_prepare()            # or: tfds build ... --file_format
  # then: --config.data.source=tfds:my_dataset --config.data.tfds_data_dir=DIR

Records: ``{"text": record[tfds_text_field]}``, or with
``tfds_text_field="PROMPT_FIELD,COMPLETION_FIELD"`` the record
``{"prompt": ..., "completion": ...}``; bytes are decoded as UTF-8.
Splits: ``tfds_train_split`` / ``tfds_eval_split``, any tfds split string
(``"train[:95%]"``, ``"train+test"``). Both splits are checked whenever either
is opened, so a missing eval split is reported before training starts.
"""

import os
from typing import Any

from lm_align.data import config
from lm_align.data.errors import DataError
from lm_align.data.sources import RandomAccessSource, register_source

EXTRA_HINT = 'pip install -e ".[seqio]"'


def import_tfds():
    """``tensorflow_datasets``, or a DataError naming the extra to install."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise DataError(
            "tfds sources need tensorflow-datasets and array_record; install the "
            f"extra: {EXTRA_HINT} (or only `pip install tensorflow-datasets "
            "array_record`: reading needs no TensorFlow)."
        ) from None
    return tfds


def _resolve_data_dir(data_dir: str | None) -> str:
    if data_dir is not None:
        return os.path.expanduser(data_dir)
    # pylint: disable-next=g-import-not-at-top
    from tensorflow_datasets.core import constants

    return constants.get_default_data_dir()


def _not_prepared(name: str, data_dir: str, detail: str) -> DataError:
    base = name.split(":")[0]
    return DataError(
        f"tfds dataset {name!r} is not prepared in data_dir {data_dir!r} "
        f"({detail}). lm_align reads tfds datasets offline, in array_record "
        "format, and never downloads. Prepare it once on a machine with the "
        f"data: `tfds build {base} --data_dir={data_dir} "
        "--file_format=array_record` for a registered dataset, or for your own "
        "builder class `MyDataset(data_dir=DIR, file_format='array_record')"
        ".download_and_prepare()`; then set --config.data.tfds_data_dir=DIR "
        "(see docs/data.md, 'tfds: prepare offline, read as array_record')."
    )


def _prepared_versions(data_dir: str, name: str) -> list[str]:
    base = os.path.join(data_dir, name.split(":")[0])
    found = []
    for root, _, files in os.walk(base):
        if "dataset_info.json" in files:
            found.append(os.path.relpath(root, data_dir))
    return sorted(found)


# (name, data_dir) -> prepared builder; only prepared ones are cached.
_BUILDERS: dict[tuple[str, str], Any] = {}


def open_builder(name: str, data_dir: str | None) -> Any:
    """The prepared tfds builder ``name`` (``NAME[/CONFIG][:VERSION]``)."""
    tfds = import_tfds()
    data_dir = _resolve_data_dir(data_dir)
    if (name, data_dir) in _BUILDERS:
        return _BUILDERS[name, data_dir]
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (ValueError, AssertionError) as e:
        # DatasetNotFoundError (a ValueError): neither registered nor prepared;
        # AssertionError: a registered builder without the requested version.
        prepared = _prepared_versions(data_dir, name)
        if prepared:
            detail = f"found only {prepared}; ask for one of these versions"
        elif isinstance(e, tfds.core.registered.DatasetNotFoundError):
            detail = (
                "not a registered tfds dataset, and nothing prepared under "
                f"{os.path.join(data_dir, name.split(':')[0])}"
            )
        else:
            detail = str(e).splitlines()[0]
        raise _not_prepared(name, data_dir, detail) from None
    if not builder.is_prepared():
        raise _not_prepared(name, data_dir, f"{builder.data_dir} is missing")
    _BUILDERS[name, data_dir] = builder
    return builder


def open_split(builder: Any, name: str, split: str, key: str) -> Any:
    """``builder.as_data_source(split)``; errors list the dataset's splits."""
    available = sorted(builder.info.splits.keys())
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:
        raise DataError(
            f"tfds dataset {name!r} at {builder.data_dir} is prepared as "
            f"{builder.info.file_format.value}, which has no random access; "
            "prepare it again with file_format='array_record' (e.g. `tfds build "
            "... --file_format=array_record`) into a fresh data_dir."
        ) from None
    except (ValueError, KeyError) as e:
        hint = (
            "; no held-out split? carve one out of train: "
            "--config.data.tfds_train_split='train[1%:]' "
            "--config.data.tfds_eval_split='train[:1%]'"
            if key == "tfds_eval_split"
            else ""
        )
        raise DataError(
            f"{key}={split!r} does not work for tfds dataset {name!r} ({e}); its "
            f"splits are {available}. Set --config.data.{key}=one of them (slices "
            f"such as 'train[:95%]' work too){hint}."
        ) from None


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item"):  # numpy scalar
        return _as_str(value.item())
    return value


class TfdsTextSource:
    """Records of one tfds split: ``{"text": ...}`` or prompt/completion.

    Args:
      data_source: a tfds random-access data source (``len``, ``[i]``).
      fields: ``("text_field",)`` or ``("prompt_field", "completion_field")``.
      description: for ``repr`` and error messages, e.g. "tfds:x train".
    """

    def __init__(self, data_source: Any, fields: tuple[str, ...], description: str):
        self.data_source, self.fields = data_source, fields
        self.description = description

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict[str, str]:
        example = self.data_source[index]
        values = [_as_str(example[f]) for f in self.fields]
        if len(values) == 1:
            return {"text": values[0]}
        return {"prompt": values[0], "completion": values[1]}

    def origin(self, index: int) -> str:
        """Where record ``index`` comes from, for error messages."""
        return f"{self.description} record {index}"

    def __repr__(self) -> str:
        return f"TfdsTextSource({self.description!r}, fields={self.fields}, records={len(self)})"


def _check_fields(builder: Any, name: str, fields: tuple[str, ...]) -> None:
    features = builder.info.features
    listing = {k: type(v).__name__ for k, v in features.items()}
    for field in fields:
        # FeaturesDict has no .get().
        feature = features[field] if field in features else None  # noqa: SIM401
        kind = getattr(getattr(feature, "np_dtype", None), "kind", None)
        if feature is None or not (type(feature).__name__ == "Text" or kind in ("O", "S", "U")):
            raise DataError(
                f"tfds_text_field names {field!r}, which is not a string feature of "
                f"tfds dataset {name!r}; its features are {listing}. Set "
                "--config.data.tfds_text_field=FIELD (or PROMPT_FIELD,"
                "COMPLETION_FIELD)."
            )


@register_source("tfds")
def _tfds(data_cfg: Any, split: str, arg: str) -> RandomAccessSource:
    if not arg:
        raise DataError(
            "source 'tfds' needs a dataset name: 'tfds:NAME' or "
            "'tfds:NAME:VERSION', e.g. 'tfds:my_corpus:1.0.0'."
        )
    builder = open_builder(arg, config.get(data_cfg, "tfds_data_dir"))
    fields = tuple(f.strip() for f in config.get(data_cfg, "tfds_text_field").split(","))
    if len(fields) > 2 or not all(fields):
        raise DataError(
            f"tfds_text_field={config.get(data_cfg, 'tfds_text_field')!r}; use "
            "one field name or 'PROMPT_FIELD,COMPLETION_FIELD'."
        )
    _check_fields(builder, arg, fields)
    sources = {}
    for name, key in (("train", "tfds_train_split"), ("eval", "tfds_eval_split")):
        tfds_split = config.get(data_cfg, key)
        sources[name] = TfdsTextSource(
            open_split(builder, arg, tfds_split, key),
            fields,
            f"tfds:{arg} {tfds_split}",
        )
    return sources[split]
