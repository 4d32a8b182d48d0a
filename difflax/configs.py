"""Config files at the edge: load `path.py[:variant]`, apply `--config.a.b=v`, build typed objects.

A config file defines `get_config(variant: str = "") -> ml_collections.ConfigDict` with the
sections of `configs/default.py`. Nothing past this module sees a ConfigDict: the model
becomes a `Denoiser` (frozen `UNetConfig` inside) or, for `model.kind = "sit"` (SiT on the
latents of `difflax encode`), a `SiT` (`sit_from_config`), training a `TrainConfig`. `check_config`
validates every value of those sections first (type, range, known names, the batch against
the devices), so that bad input ends in one line naming the key, the value and what is
allowed. Sampler specs ("deis_tab3:10") are parsed here too, for configs and the CLI alike.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
import sys

import ml_collections

from difflax import data
from difflax.gmem import SAMPLING
from difflax.interpolants import INTERPOLANTS, SIT_PREDICTIONS
from difflax.latents import latents_info
from difflax.models import Denoiser, UNetConfig
from difflax.models.sit import SiT, SiTConfig
from difflax.training.interpolant_loss import LOSS_WEIGHTS
from difflax.samplers import SAMPLERS, split_sampler_name
from difflax.training import TrainConfig

# the configs/ folder of the repository (beside the difflax package)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_configs() -> list[str]:
    """The config files in configs/ (configs/NAME.py), read from the folder, sorted."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f"configs/{f}" for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".py") and f not in ("__init__.py", "default.py"))


def load_config(spec: str, overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """`spec` is "path/to/config.py" or "path/to/config.py:variant"; overrides "a.b=value"."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        shipped = ", ".join(shipped_configs()) or f"none found in {CONFIG_DIR}"
        raise FileNotFoundError(f"no config file {path!r}; the shipped configs are: {shipped}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    sys.path.insert(0, root)  # so that `from configs import default` resolves
    try:
        name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(variant)
    finally:
        sys.path.remove(root)
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Sets "a.b=value", parsing value as the existing field's type. Unknown keys are errors."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.steps=10)")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in keys:
            where = ".".join(parts[:i]) or "the config"
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}; valid keys in {where}: "
                             f"{', '.join(sorted(keys))}")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    node[leaf] = _parse_like(node[leaf], text, key)


def _parse_like(current, text: str, key: str):
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config key {key!r} takes true or false, not {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"config key {key!r} takes a {type(current).__name__}, not {text!r}") from None
    if isinstance(current, (tuple, list)):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(f"config key {key!r} takes a {type(current).__name__}, not {text!r}")
    return value


def dataset_spec(config) -> data.DatasetSpec:
    """The dataset's example shape and class count, checked to be images a UNet takes."""
    d = config.data
    spec = data.dataset_spec(d.name, resolution=d.resolution or None)
    if len(spec.shape) != 3:
        raise ValueError(f"dataset {d.name!r} holds vectors of shape {spec.shape}, not images; "
                         "the UNet configs train on digits or tfds:<image dataset>")
    return spec


def denoiser_from_config(config) -> Denoiser:
    """The Denoiser (UNet + preconditioning) a config describes, sized to its dataset."""
    m = dict(config.model)
    spec = dataset_spec(config)
    h, w, c = spec.shape
    if h != w:
        raise ValueError(f"images of {h}x{w} are not square; the UNet takes R x R images")
    precond = {k: m.pop(k) for k in ("precond", "sigma_data")}
    conditional = m.pop("conditional")
    net = UNetConfig(img_resolution=h, in_channels=c, out_channels=c,
                     label_dim=spec.num_classes if conditional else 0, **m)
    return Denoiser(net=net, **precond)


# what a config's `model.kind` says it trains; a config without the key (every config and
# run directory from before SiT runs) is a UNet run
MODEL_KINDS = ("unet", "sit")
SIT_ODE_METHODS = ("euler", "heun")


def model_kind(config) -> str:
    """"unet" or "sit": the config's `model.kind` ("unet" if it has none)."""
    kind = config.model.get("kind", "unet")
    check_value("model.kind", kind, kind in MODEL_KINDS, f"one of {', '.join(MODEL_KINDS)}")
    return kind


def sit_from_config(config) -> SiT:
    """The `SiT` a `model.kind = "sit"` config describes, sized to the latents of
    `data.latents_dir` (latents.json: latent shape (h, h, C), class count, snippet size):
    labels if `model.conditional`, GMem's stored snippets if `model.memory`, and a REPA
    projector after block `model.repa_depth` to the stored features if `transport.repa_weight`
    > 0 (configs from before REPA have neither key: no projector)."""
    m, info = config.model, latents_info(config.data.latents_dir)
    h, _, c = info["latent_shape"]
    repa = config.transport.get("repa_weight", 0.0) > 0
    for key, wanted in (("model.memory = True", m.memory), ("transport.repa_weight > 0", repa)):
        if wanted and "feature_dim" not in info:
            raise ValueError(f"{key} needs features stored with the latents; "
                             f"{config.data.latents_dir} has none: encode with `difflax encode "
                             "--features digits_classifier`")
    fields = {k: m[k] for k in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                                "class_dropout_prob", "learn_sigma", "snippet_dropout_prob")}
    if repa:
        fields.update(repa_depth=m.repa_depth, repa_hidden=m.repa_hidden,
                      repa_dim=info["feature_dim"])
    return SiT(SiTConfig(input_size=h, in_channels=c, **fields,
                         num_classes=info["num_classes"] if m.conditional else 0,
                         snippet_dim=info["feature_dim"] if m.memory else 0))


def model_defaults(config) -> dict:
    """The model keys a run's config.json may lack (a run saved before difflax added the key)
    and the value such a run is built with: `kind` "unet"; for a UNet run each `UNetConfig`
    field's default (`denoiser_from_config` passes the keys it finds); for a SiT run the REPA
    projector's keys, unused without `transport.repa_weight`."""
    if model_kind(config) == "sit":  # runs from before REPA had no projector: any value fits
        return {"kind": "unet", **{k: config.model.get(k) for k in ("repa_depth", "repa_hidden")}}
    return {"kind": "unet", **{f.name: f.default for f in dataclasses.fields(UNetConfig)
                               if f.default is not dataclasses.MISSING}}


def model_from_config(config):
    """The model a config trains: a `Denoiser` (`denoiser_from_config`) or, for
    `model.kind = "sit"`, a `SiT` (`sit_from_config`)."""
    return sit_from_config(config) if model_kind(config) == "sit" else denoiser_from_config(config)


def sit_fields(overrides: tuple[str, ...]) -> dict:
    """`--sit.FIELD=VALUE` items of `difflax sample --sit` -> {field: value} of SiTConfig,
    each value parsed as the field's type (`apply_override`); unknown fields are errors that
    list the valid ones."""
    fields = ml_collections.ConfigDict(dataclasses.asdict(SiTConfig()))
    for item in overrides:
        apply_override(fields, item)
    return {k: fields[k] for k in dict.fromkeys(item.partition("=")[0] for item in overrides)}


def train_config(config) -> TrainConfig:
    t = dict(config.train)
    t["grad_clip"] = t["grad_clip"] or None
    return TrainConfig(**t)


# ---------------------------------------------------------------------------- validation


def _integer(lo: int):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo,
            f"an integer >= {lo}")


def _number(lo: float, hi: float | None = None, *, open_lo: bool = True):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return (v > lo if open_lo else v >= lo) and (hi is None or v < hi)
    low = f"> {lo}" if open_lo else f">= {lo}"
    return ok, f"a number {low}" + (f" and < {hi}" if hi is not None else "")


def _integers(lo: int, *, nonempty: bool):
    ok = lambda v: (isinstance(v, (tuple, list)) and (len(v) > 0 or not nonempty)
                    and all(_integer(lo)[0](x) for x in v))
    return ok, f"a {'non-empty ' if nonempty else ''}tuple of integers >= {lo}"


_BOOL = (lambda v: isinstance(v, bool), "true or false")

def _choice(choices):
    return lambda v: v in choices, f"one of {', '.join(map(repr, choices))}"


# key -> (predicate, what is allowed): the values `difflax train | sample | evaluate` read.
# Names (dataset, model_type, precond, ...) are checked where they are used, with their choices.
TRAIN_RULES = {
    "train.steps": _integer(1),
    "train.batch_size": _integer(1),
    "train.lr": _number(0),
    "train.warmup_steps": _integer(0),
    "train.weight_decay": _number(0, open_lo=False),
    "train.grad_clip": (_number(0, open_lo=False)[0], "a number >= 0 (0: no clipping)"),
    "train.ema_halflife_kimg": _number(0),
    "train.ema_rampup_ratio": (lambda v: v is None or _number(0)[0](v), "a number > 0 or None"),
    "train.ema_decay": (lambda v: v is None or _number(0, 1)[0](v),
                        "a number > 0 and < 1 (a constant EMA decay) or None (the half-life)"),
    "train.log_every": (_integer(0)[0], "an integer >= 0 (0: never)"),
    "train.ckpt_every": (_integer(0)[0], "an integer >= 0 (0: only at the end)"),
    "train.keep_checkpoints": _integer(1),
    "train.sample_every": (_integer(0)[0], "an integer >= 0 (0: never)"),
    "train.seed": _integer(0),
    "train.tensorboard": _BOOL,
    "train.wandb": (lambda v: isinstance(v, str), "a W&B project name, or '' (off)"),
    "train.compute_dtype": (lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16"),
    "sample.steps": _integer(1),
    "sample.num": _integer(1),
    "sample.seed": _integer(0),
    "evaluate.num": _integer(1),
    "evaluate.batch_size": _integer(1),
}
UNET_RULES = {
    "data.resolution": (_integer(0)[0], "an integer >= 0 (0: the dataset's own)"),
    "data.random_flip": _BOOL,
    "model.sigma_data": _number(0),
    "model.model_channels": _integer(1),
    "model.channel_mult": _integers(1, nonempty=True),
    "model.channel_mult_emb": _integer(1),
    "model.num_blocks": _integer(1),
    "model.attn_resolutions": _integers(1, nonempty=False),
    "model.dropout": _number(0, 1, open_lo=False),
    "model.label_dropout": _number(0, 1, open_lo=False),
    "model.channel_mult_noise": _integer(1),
    "model.conditional": _BOOL,
    "sample.sigma_min": _number(0),
    "sample.sigma_max": _number(0),
}
SIT_RULES = {
    "data.name": _choice(("latents",)),
    "data.latents_dir": (lambda v: isinstance(v, str) and v != "",
                         "the output directory of `difflax encode`"),
    "data.random_flip": _BOOL,
    "data.sample_posterior": _BOOL,
    "model.kind": _choice(MODEL_KINDS),
    "model.patch_size": _integer(1),
    "model.hidden_size": _integer(1),
    "model.depth": _integer(1),
    "model.num_heads": _integer(1),
    "model.mlp_ratio": _number(0),
    "model.class_dropout_prob": _number(0, 1, open_lo=False),
    "model.snippet_dropout_prob": _number(0, 1, open_lo=False),
    "model.learn_sigma": _BOOL,
    "model.conditional": _BOOL,
    "model.memory": _BOOL,
    "model.repa_depth": _integer(1),
    "model.repa_hidden": _integer(1),
    "transport.repa_weight": _number(0, open_lo=False),
    "transport.interpolant": _choice(INTERPOLANTS),
    "transport.prediction": _choice(tuple(SIT_PREDICTIONS)),
    "transport.loss_weight": _choice(("",) + LOSS_WEIGHTS[1:]),
    "sample.method": _choice(SIT_ODE_METHODS),
    "sample.cfg_scale": _number(0),
    "sample.bank_sampling": _choice(SAMPLING),
}


def check_value(key: str, value, ok: bool, allowed: str) -> None:
    """Raises ValueError("config key KEY = VALUE: must be ALLOWED") unless `ok`."""
    if not ok:
        raise ValueError(f"config key {key!r} = {value!r}: must be {allowed}")


def check_config(config, num_devices: int) -> None:
    """Validates the data / model / train / sample / evaluate values a run reads (see
    TRAIN_RULES and UNET_RULES or SIT_RULES, by `model_kind`): types, ranges, sampler names
    and steps, sigma_min < sigma_max, and a training batch that splits evenly over
    `num_devices` (the global device count). Raises a one-line ValueError."""
    kind = model_kind(config)
    variant = ":sit" if kind == "sit" else ""
    defaults = load_config(os.path.join(CONFIG_DIR, "default.py") + variant)
    missing = [f"{section}.{k}" for section in defaults for k in defaults[section]
               if k not in config.get(section, {})]
    if missing:
        raise ValueError(f"this config lacks {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} (keys of configs/default.py"
                         f"{variant} that `difflax` runs read); it belongs to an experiment script "
                         "(see its docstring)")
    rules = {**TRAIN_RULES, **(SIT_RULES if kind == "sit" else UNET_RULES)}
    for key, (ok, allowed) in rules.items():
        section, name = key.split(".")
        check_value(key, config[section][name], ok(config[section][name]), allowed)
    t, s = config.train, config.sample
    check_value("train.batch_size", t.batch_size, t.batch_size % num_devices == 0,
                f"divisible by the {num_devices} devices (each takes an equal share)")
    if kind == "sit":
        for spec in config.evaluate.samplers:
            parse_sampler(spec, kind)
        return
    check_value("sample.sigma_max", s.sigma_max, s.sigma_max > s.sigma_min,
                f"> sample.sigma_min = {s.sigma_min}")
    check_value("sample.sampler", s.sampler, _known_sampler(s.sampler), _SAMPLER_CHOICES)
    for spec in config.evaluate.samplers:
        parse_sampler(spec)


_SAMPLER_CHOICES = ("one of " + ", ".join(SAMPLERS)
                    + " (deis_tab, deis_rhoab and ipndm with their order appended: deis_tab3)")


def _known_sampler(name) -> bool:
    return isinstance(name, str) and split_sampler_name(name)[0] in SAMPLERS


def parse_sampler(spec: str, kind: str = "unet") -> tuple[str, int]:
    """"edm_heun:18" -> ("edm_heun", 18); "deis_tab3:10" -> ("deis_tab3", 10). The name must
    be a known sampler of the run's `kind` (a SiT run's: its ODE methods, "heun:50") and
    the steps an integer >= 1."""
    name, sep, steps = spec.partition(":")
    if not sep or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"sampler {spec!r} must be NAME:STEPS with STEPS an integer >= 1 "
                         "(e.g. edm_heun:18, deis_tab3:10), or NAME with --steps N")
    if kind == "sit" and name not in SIT_ODE_METHODS:
        raise ValueError(f"unknown sampler {name!r} in {spec!r} for a SiT run; valid: "
                         f"{', '.join(SIT_ODE_METHODS)} (SiT's ODE)")
    if kind != "sit" and not _known_sampler(name):
        raise ValueError(f"unknown sampler {name!r} in {spec!r}; valid: {_SAMPLER_CHOICES}")
    return name, int(steps)


