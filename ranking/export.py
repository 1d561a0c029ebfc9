"""The weights-only export of a run's best model: what serving loads.

``<run>/export/model.safetensors`` holds every tensor of the unsharded model
(buffers such as the item vocabulary and the numeric bin edges included),
``<run>/export/model.json`` the run's config and table sizes. Loading reads
only safetensors and JSON, so it runs no code; DCP's ``.metadata`` and its
non-tensor entries are pickles, which serving never opens. Both files are
part of the run's unit (``sidrank.io.publish_unit``), so their sha256 is
checked against ``<run>/unit.json`` before anything is read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import safetensors
import safetensors.torch

from sidrank import contract
from sidrank.io import read_json, require_complete_unit, write_json
from sidrank.schema import DataError
from ranking.checkpoint import Loaded, load_checkpoint, unsharded_model

EXPORT_DIR = "export"
WEIGHTS, MODEL_JSON = f"{EXPORT_DIR}/model.safetensors", f"{EXPORT_DIR}/model.json"
EXPORT_FORMAT = 1
# What every finished run holds, with or without a model.
RESULTS = ("metrics.json", "predictions_valid.parquet", "predictions_test.parquet")
# The keys of model.json that load_export reads, as paths from the top.
MODEL_JSON_KEYS = (("config", "features"), ("config", "model"), ("meta", "n_users"), ("meta", "n_items"))


def _retrain(run: Path) -> str:
    return f"python -m ranking.train --config {run / 'metrics.json'}"


def require_model_keys(description: object, run: Path) -> None:
    """Refuse a ``model.json`` without a key of :data:`MODEL_JSON_KEYS` (hand-edited, or from another writer).

    Raises:
        DataError: naming the file, the first missing key and the command that writes a new export.
    """
    for path in MODEL_JSON_KEYS:
        node = description
        for depth, key in enumerate(path):
            if not isinstance(node, dict) or key not in node:
                raise DataError(f"{run / MODEL_JSON}: missing key '{'.'.join(path[:depth + 1])}'; retrain to write a "
                                f"new export: `{_retrain(run)}`")
            node = node[key]


def read_run(run: Path, *, with_export: bool = False) -> dict:
    """A finished run's metrics.json, after checking the run's files (predictions too) against its unit.json.

    Args:
        with_export: also require the weights-only export (what serving loads).

    Raises:
        DataError: an unfinished run (no unit.json), or a file missing or changed since the run wrote it.
    """
    require_complete_unit(run, _retrain(run), files=(*RESULTS, *((MODEL_JSON, WEIGHTS) if with_export else ())))
    return read_json(run / "metrics.json")


def write_export(out: Path, meta: contract.FeatureMeta) -> None:
    """``out/export``: the weights of ``out/checkpoint`` as safetensors, the config and table sizes as JSON (rank 0).

    ``out`` is the run's staging folder: the unit's manifest records both files.
    """
    loaded = load_checkpoint(out / "checkpoint", meta)
    tensors = {k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}
    (out / EXPORT_DIR).mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(out / WEIGHTS), metadata={"format": str(EXPORT_FORMAT)})
    description = {"format": EXPORT_FORMAT, "config": loaded.config, "meta": dataclasses.asdict(loaded.meta)}
    write_json(description, out / MODEL_JSON)


def load_export(run: Path, meta: contract.FeatureMeta) -> Loaded:
    """The run's exported model, unsharded on CPU, after checking its files against the run's manifest.

    Reads only JSON and safetensors (no pickle). The id tables keep the
    export's sizes (the store may have grown since training; newer ids are
    served as unknown); every other table must match ``meta``.

    Raises:
        DataError: an unfinished or altered run, an export of another format or without a key it
            needs, tables that differ from ``meta``.
    """
    require_complete_unit(run, _retrain(run), files=(*RESULTS, MODEL_JSON, WEIGHTS))
    description = json.loads((run / MODEL_JSON).read_text())
    if description.get("format") != EXPORT_FORMAT:
        raise DataError(f"{run / MODEL_JSON}: key 'format' is {description.get('format')!r}, expected "
                        f"{EXPORT_FORMAT}; retrain with this version of `python -m ranking.train`")
    require_model_keys(description, run)
    try:
        tensors = safetensors.torch.load_file(str(run / WEIGHTS))
    except safetensors.SafetensorError as exc:
        raise DataError(f"{run / WEIGHTS}: not a safetensors file ({exc}); retrain into {run}") from exc
    trained = description["meta"]
    sizes = dataclasses.replace(meta, n_users=trained["n_users"], n_items=trained["n_items"])
    loaded = unsharded_model(description["config"], sizes, {k: tuple(v.shape) for k, v in tensors.items()}, run / WEIGHTS)
    loaded.model.load_state_dict(tensors)
    return loaded._replace(model=loaded.model.eval())
