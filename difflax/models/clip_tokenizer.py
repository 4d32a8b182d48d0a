"""CLIP's tokenizer (Radford et al. 2021, Sec. 2.4: lower-cased byte-level BPE, 49152 merges)
from a local tokenizer/ folder of a Stable Diffusion checkpoint (vocab.json and merges.txt,
or tokenizer.json; tokenizer_config.json / special_tokens_map.json), run by HF's `tokenizers`
package.

Text -> NFC, runs of whitespace -> one space, lower case -> split into CLIP's pre-tokens
(the special tokens, 's 't 're 've 'm 'll 'd, letter runs, single digits, other non-space
runs) -> bytes as printable characters -> BPE, the last piece of a word marked `</w>`.
A prompt becomes `[bos] + its first max_length - 2 tokens + [eos]`, padded to max_length
with the folder's pad token (SD 1.x: <|endoftext|>, SD 2.x: "!"; special tokens are found
in the text before splitting, so SD 2.x encodes every "!" as its pad token), as diffusers' pipelines
ask transformers' CLIPTokenizer for (padding="max_length", truncation=True).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from difflax.models.diffusers_weights import read_json

# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py)
PRETOKEN_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
                    r"[\p{N}]|[^\s\p{L}\p{N}]+")
_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 77}


def _token_settings(folder: str) -> dict:
    """Special tokens and max length from tokenizer_config.json, then special_tokens_map.json
    (entries may be strings or {"content": ...} dicts)."""
    settings = dict(_DEFAULTS)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        for key, value in read_json(os.path.join(folder, name)).items():
            if key in settings and value is not None:
                settings[key] = value["content"] if isinstance(value, dict) else value
    settings["model_max_length"] = min(int(settings["model_max_length"]), 77)
    return settings


class CLIPTokenizer:
    """`tokenizer(prompts)` -> input ids (B, max_length) int32; `tokenizer.encode(prompt)`
    -> the BPE ids of one prompt, without bos/eos."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], settings: dict):
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        self.max_length = settings["model_max_length"]
        bpe = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                  fuse_unk=False, unk_token=settings["unk_token"])
        self.backend = Tokenizer(bpe)
        self.backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self.backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        # special tokens are matched in the raw text before anything else (as transformers'
        # CLIPTokenizer does: with SD 2.x's pad token "!", every "!" in a prompt is id 0)
        self.backend.add_special_tokens(
            [settings[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")])
        ids = {k: vocab.get(settings[k]) for k in ("bos_token", "eos_token", "pad_token")}
        missing = [settings[k] for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"special token(s) {missing} are not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]

    def encode(self, prompt: str) -> list[int]:
        return self.backend.encode(prompt, add_special_tokens=False).ids

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        for i, prompt in enumerate(prompts):
            ids = [self.bos_id, *self.encode(prompt)[:self.max_length - 2], self.eos_id]
            out[i, :len(ids)] = ids
        return out


def _vocab_and_merges(path: str) -> tuple[dict, list]:
    """vocab.json + merges.txt (the Hub's SD folders), else the BPE model of tokenizer.json
    (what transformers 5 saves)."""
    vocab_file, merges_file = (os.path.join(path, n) for n in ("vocab.json", "merges.txt"))
    if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
        with open(merges_file, encoding="utf-8") as f:
            lines = [line.split() for line in f.read().splitlines()
                     if line and not line.startswith("#version")]
        return read_json(vocab_file), [tuple(pair) for pair in lines]
    model = read_json(os.path.join(path, "tokenizer.json")).get("model", {})
    if model.get("type") != "BPE":
        raise FileNotFoundError(f"no vocab.json + merges.txt (or BPE tokenizer.json) in {path}: "
                                "pass a local CLIP tokenizer folder, e.g. the tokenizer/ folder "
                                "of a Stable Diffusion checkpoint")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def load_clip_tokenizer(path: str | os.PathLike) -> CLIPTokenizer:
    """CLIP's tokenizer from a local folder with vocab.json and merges.txt (e.g. the
    tokenizer/ folder of a Stable Diffusion checkpoint) or the tokenizer.json of a BPE
    tokenizer; special tokens and max length from its tokenizer_config.json /
    special_tokens_map.json if present (else CLIP's: 77 tokens, pad = eos = <|endoftext|>)."""
    path = os.fspath(path)
    return CLIPTokenizer(*_vocab_and_merges(path), _token_settings(path))
