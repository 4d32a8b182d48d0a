"""A directory of numbered .npz chunks described by one JSON file, written so that a killed
run started again finishes with the same files (Reflow pairs, latent datasets).

    out_dir/
      <name>.json           the description (must match when resuming)
      chunk_00000.npz       chunk i, written to chunk_0000i.tmp.npz and renamed into place
      ...

On several processes only process 0 writes.
"""
from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np


def chunk_path(out_dir: str, i: int) -> str:
    return os.path.join(out_dir, f"chunk_{i:05d}.npz")


def open_chunks(out_dir: str, name: str, meta: dict, num_chunks: int) -> list[int]:
    """Creates `out_dir` with `<name>.json` = meta, or checks that the one there is the same
    (else one error naming the differences); removes temporary files of a killed run; returns
    the indices of the chunks still to write."""
    meta = json.loads(json.dumps(meta))
    primary = jax.process_index() == 0
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, f"{name}.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in meta.items() if old.get(k) != v]
            raise ValueError(f"{out_dir} holds other {name} ({'; '.join(diff[:3])}); use a new "
                             "directory")
    elif primary:
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=2)
    if primary:
        for stale in glob.glob(os.path.join(out_dir, "*.tmp.npz")):
            os.remove(stale)
    return [i for i in range(num_chunks) if not os.path.exists(chunk_path(out_dir, i))]


def write_chunk(out_dir: str, i: int, **arrays) -> None:
    """Writes chunk i atomically (process 0 only)."""
    if jax.process_index() == 0:
        path = chunk_path(out_dir, i)
        tmp = path[:-len(".npz")] + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def read_meta(out_dir: str, name: str, how_to_make: str) -> dict:
    """The description `<name>.json` of `out_dir`; its absence is an error saying how to
    make it."""
    meta_path = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{out_dir} holds no {name} (no {name}.json); make them with "
                                f"{how_to_make}")
    with open(meta_path) as f:
        return json.load(f)


def read_chunks(out_dir: str, name: str, count_key: str, keys, how_to_make: str):
    """(meta, {key: the chunks' arrays concatenated}); the number of chunks is
    ceil(meta[count_key] / meta["chunk_size"]) and every one must be present."""
    meta = read_meta(out_dir, name, how_to_make)
    num_chunks = -(-meta[count_key] // meta["chunk_size"])
    missing = [i for i in range(num_chunks) if not os.path.exists(chunk_path(out_dir, i))]
    if missing:
        raise FileNotFoundError(f"{out_dir} lacks {len(missing)} of {num_chunks} chunks (e.g. "
                                f"{missing[0]}); run {how_to_make} again to finish them")
    parts = {k: [] for k in keys}
    for i in range(num_chunks):
        with np.load(chunk_path(out_dir, i)) as f:
            for k in parts:
                parts[k].append(f[k])
    return meta, {k: np.concatenate(v) for k, v in parts.items()}
