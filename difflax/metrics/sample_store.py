"""Resumable evaluations: the batches an evaluation has drawn, kept on disk.

An experiment cell of 2000+ samples on a CPU takes tens of minutes, and a table has dozens of
cells. With ``evaluate_samples(..., store=ROOT, store_tag=TAG)`` each drawn batch (images and
labels, float32, compressed) is written to ``ROOT/<TAG as a file name>-<its hash>/batch_00000.npz`` ... as
soon as it is drawn, so an interrupted experiment run again with the same arguments draws only
the batches it lacks and reports exactly what an uninterrupted run reports (the metrics are
recomputed from the stored images: cheap beside sampling).

The tag names the cell (model, sampler, plan, ...), so one root serves a whole experiment.
``store.json`` in each cell's folder records what determines its batches: the tag, the number
of samples, the batch size, the settings and the key's data. A folder written by another
evaluation is an error that names the difference, never silently mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Callable

import jax
import numpy as np

__all__ = ["SampleStore", "fingerprint"]


class SampleStore:
    """Batches of one evaluation, the cell `tag`, in a folder of `root` named after the tag
    (created if missing; `self.path`).

    `identity`: JSON-serialisable values that determine the batches; a folder that holds a
    store of another tag or other values is a ValueError listing them."""

    def __init__(self, root: str, tag: str, **identity):
        name = re.sub(r"[^A-Za-z0-9.=+-]+", "_", tag).strip("_")[:60]
        self.path = path = os.path.join(root, f"{name}-{fingerprint(tag)}")
        os.makedirs(path, exist_ok=True)
        meta = os.path.join(path, "store.json")
        identity = json.loads(json.dumps({"tag": tag, **identity}))  # tuples -> lists
        if os.path.exists(meta):
            with open(meta) as f:
                old = json.load(f)
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in identity.items() if old.get(k) != v]
            if diff or set(old) != set(identity):
                raise ValueError(f"sample store {path} holds batches of another evaluation "
                                 f"({'; '.join(diff) or 'other fields'}); delete it or choose "
                                 "another folder")
        else:
            with open(meta + ".tmp", "w") as f:
                json.dump(identity, f, indent=1)
            os.replace(meta + ".tmp", meta)

    def batch(self, i: int, draw: Callable[[], tuple]) -> tuple:
        """Batch i as (images, labels or None): read back if stored, else drawn with `draw()` and stored
        (atomically: a batch file is complete or absent)."""
        file = os.path.join(self.path, f"batch_{i:05d}.npz")
        if os.path.exists(file):
            with np.load(file) as f:
                return f["images"], (f["labels"] if "labels" in f else None)
        images, labels = draw()
        arrays = {"images": np.asarray(images)}
        if labels is not None:
            arrays["labels"] = np.asarray(labels)
        with open(file + ".tmp", "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(file + ".tmp", file)
        return arrays["images"], arrays.get("labels")

    @staticmethod
    def key_data(key: jax.Array) -> list[int]:
        """A PRNG key as JSON (for `identity`)."""
        return np.asarray(jax.random.key_data(key)).ravel().tolist()


def fingerprint(value) -> str:
    """12 hex digits of the SHA-1 of a string, or of an array tree's values (a model's
    parameters: part of a cell's tag, so that a store of other weights is not reused)."""
    h = hashlib.sha1()
    if isinstance(value, str):
        h.update(value.encode())
    else:
        for leaf in jax.tree.leaves(value):
            h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()[:12]
