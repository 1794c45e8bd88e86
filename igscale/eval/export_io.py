"""Inference exports (`model.safetensors` + `model_config.json`) on a local folder or an s3:// prefix.

The file format itself is the lead's `igscale.models.convert.save/load_inference_export`; this module only moves
the two files through `igscale.storage` so training can publish an export and evaluation can consume it anywhere.
"""
from __future__ import annotations

import os
import tempfile

from igscale.models.convert import EXPORT_CONFIG, EXPORT_WEIGHTS, load_inference_export, save_inference_export
from igscale.storage import is_s3_url, open_storage

__all__ = ["save_export", "load_export", "EXPORT_WEIGHTS", "EXPORT_CONFIG"]


def save_export(model, dir_or_url: str, extra: dict | None = None) -> None:
    """Write the export of `model` (pass the EMA weights) to a folder or an s3:// prefix."""
    if not is_s3_url(dir_or_url):
        save_inference_export(model, dir_or_url.removeprefix("file://"), extra)
        return
    store = open_storage(dir_or_url)
    with tempfile.TemporaryDirectory() as tmp:
        save_inference_export(model, tmp, extra)
        # weights first, config last: a reader that finds the config finds complete weights
        store.put_file(EXPORT_WEIGHTS, os.path.join(tmp, EXPORT_WEIGHTS))
        store.put_file(EXPORT_CONFIG, os.path.join(tmp, EXPORT_CONFIG))


def load_export(dir_or_url: str):
    """Rebuild the model of an export (eval mode) from a folder or an s3:// prefix."""
    if not is_s3_url(dir_or_url):
        return load_inference_export(dir_or_url.removeprefix("file://"))
    store = open_storage(dir_or_url)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
            try:
                store.get_file(name, os.path.join(tmp, name))
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"inference export {dir_or_url} is missing {name} (expected {EXPORT_WEIGHTS} + {EXPORT_CONFIG})"
                ) from e
        return load_inference_export(tmp)
