"""RunConfig: the one description of a training run, and its validation and hash.

Every name here is the DESIGN vocabulary. The CLI options, MLproject parameters, YAML spec keys
and MLflow params are all generated from (or checked against) the fields of `RunConfig`, so a
field added here shows up everywhere at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import activations
from .norms import NORMS as NORM_REGISTRY

ACTIVATIONS = activations.NAMES
INITS = (
    "default",
    "normal",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "lecun_normal",
    "orthogonal",
)
GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # blocks of a recurrent cell's weights (lstm: i, f, g, o; gru: r, z, n)
ARCHS = ("mlp", *GATES)
SEQUENCE_SHAPES = {"rows": (28, 28), "pixels": (784, 1)}  # MNIST as (steps T, pixels per step d)
SEQUENCES = tuple(SEQUENCE_SHAPES)
RECURRENT_INITS = ("same", *INITS, "identity")  # same: W as U (init, init_std, init_gain)
CLIPS = ("none", "norm", "value", "agc")
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "fp64", "bf16", "fp16", "tf32")
NORMS = tuple(NORM_REGISTRY)
RESIDUALS = ("none", "plain", "skipinit")
MNIST_TRAIN_SIZE = 60_000
# Bounds that keep a typo from exhausting the machine: the papers go to depth 300 and width 2,048,
# the standard grid has 7,680 configurations. What a run needs in memory is checked on top
# (model.check_memory), against what the device has.
MAX_DEPTH = 1_000
MAX_WIDTH = 16_384
MAX_GRID_CONFIGS = 100_000
MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_VALUES = 100_000  # values in a spec, counted after YAML aliases are followed (alias bombs)

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


# The version of the numbers a run produces. Bump it with any change that alters what a run computes
# or records for the same configuration (the loop, the monitor, the theory, the metrics): a grid
# reuses only FINISHED runs of this version (tag gradbench.numbers_version) and reruns the others.
# 2: normalization/residual fields, canonical configurations, the forward q/c signal, theory profiles.
# 4: batches drawn on the CPU, so a seed trains on the same batches on any device (CUDA runs drew
#    theirs from the GPU's generator: another sequence, measured 13-34% apart in step 0's layer norms);
#    theory.fixed_point accelerated, so critical inits' predictions reach chi = 1 (plain iteration
#    stopped 2,000 steps short of it, at 0.9995).
# 5: SGD steps each member with its own lr and momentum (train.MemberSGD): p - lr * buf rounds
#    twice where torch.optim.SGD's p.add_(buf, alpha=-lr) rounds once, 1 ulp a step apart.
# 6: a group's Linear products run feature-major (model.StackedLinear): W x^T instead of x W^T, the
#    same sums in another order, so a member of a group differs from version 5 by ulps (fp32). The
#    saturated/dead fraction of a bf16 or fp16 run is averaged in fp32 (it was rounded to the run's
#    dtype). The fixed-point iterations (theory._iterate) no longer jump across the fixed point
#    they head for: c* and theory/xi_c changed where they did (tanh with He init logged c* = 0.63,
#    xi_c = 157 where c* = 0, xi_c = 21.7) and on the critical line, where q* and c* creep and
#    stop elsewhere within the tolerance (tanh at sigma_w^2 = 1: xi_c 29,706 -> 198,957, both huge).
NUMBERS_VERSION = 6


class ConfigError(ValueError):
    """A bad configuration value; `key` names the offending field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _spec(help: str, member: bool = False, hashed: bool = True, **constraints: Any) -> dict[str, Any]:
    """A field's metadata: its help text, its bounds or choices, and two facts the rest derive from:
    member=True: configs that differ in it can still train together as members of one group
    (each member is built and clipped with its own value); hashed=False: it does not change the
    numbers a run produces (a run on another device or with another metric stride is the same run)."""
    return {"help": help, "member": member, "hashed": hashed, **constraints}


@dataclass(frozen=True)
class RunConfig:
    """One training run. Constraints in each field's metadata drive validation and the CLI."""

    activation: str = field(default="relu", metadata=_spec(
        "Hidden-layer nonlinearity (the RNN's phi; LSTM and GRU have their own).", choices=ACTIVATIONS))
    arch: str = field(default="mlp", metadata=_spec(
        "mlp, or a recurrent net reading MNIST as a sequence: rnn (h_t = phi(W h_t-1 + U x_t + b)), lstm, gru "
        "(PyTorch's cells); the classifier reads the last state. --width is the state's size.", choices=ARCHS))
    sequence: str = field(default="rows", metadata=_spec(
        "How a recurrent net reads an image: rows (28 steps of 28 pixels) or pixels (784 steps of 1).",
        choices=SEQUENCES))
    depth: int = field(default=10, metadata=_spec("Number of Linear layers, output layer included.", min=2,
                                                  max=MAX_DEPTH))
    width: int = field(default=256, metadata=_spec("Units in each hidden layer.", min=1, max=MAX_WIDTH))
    init: str = field(default="default", metadata=_spec("Weight initialization scheme.", member=True, choices=INITS))
    init_std: float = field(default=1.0, metadata=_spec("Std of the weights for --init normal (ignored otherwise).", member=True, gt=0.0))
    init_gain: float = field(
        default=1.0, metadata=_spec(
            "Multiplies the weight std of xavier_*, he_*, lecun_normal, orthogonal (ignored otherwise).", member=True, gt=0.0)
    )
    recurrent_init: str = field(default="same", metadata=_spec(
        "Init of a recurrent net's W (same: as --init for U), or identity (IRNN, Le et al. 2015); each "
        "gate's block of an LSTM/GRU on its own.", member=True, choices=RECURRENT_INITS))
    recurrent_gain: float = field(default=1.0, metadata=_spec(
        "Multiplies a recurrent net's W after its init (a scaled identity, a large recurrent scale).",
        member=True, gt=0.0))
    bias_std: float = field(
        default=0.0, metadata=_spec(
            "Biases ~ N(0, bias_std^2) for every init but default (0: zero; ignored with default).", member=True, min=0.0)
    )
    clip: str = field(default="none", metadata=_spec("Gradient clipping mode.", member=True, choices=CLIPS))
    clip_threshold: float = field(
        default=1.0, metadata=_spec(
            "Max global norm (norm), max |g| (value) or max ratio (agc); ignored with --clip none.", member=True, gt=0.0)
    )
    norm: str = field(default="none", metadata=_spec(
        "Normalization of each hidden pre-activation before phi: batch (BatchNorm1d) or layer (LayerNorm).",
        choices=NORMS))
    residual: str = field(default="none", metadata=_spec(
        "Residual blocks on the width-to-width layers: h + alpha * phi(norm(W h + b)); plain: alpha = "
        "--residual-scale, skipinit: alpha learned, 0 at init (De & Smith 2020).", choices=RESIDUALS))
    residual_scale: float = field(default=1.0, metadata=_spec(
        "alpha of --residual plain (ignored otherwise).", member=True, gt=0.0))
    optimizer: str = field(default="sgd", metadata=_spec("Optimizer.", choices=OPTIMIZERS))
    lr: float = field(default=0.01, metadata=_spec("Learning rate.", member=True, gt=0.0))
    momentum: float = field(default=0.9, metadata=_spec("SGD momentum (beta1 for adam).", member=True, min=0.0,
                                                        lt=1.0))
    batch_size: int = field(default=128, metadata=_spec("Mini-batch size.", min=1, max=MNIST_TRAIN_SIZE))
    epochs: int = field(default=1, metadata=_spec("Passes over the training data.", min=1))
    max_steps: int = field(default=0, metadata=_spec("Stop after this many optimizer steps (0: no limit).", min=0))
    train_subset: int = field(
        default=0, metadata=_spec("Train on the first N training images (0: all 60,000).", min=0, max=MNIST_TRAIN_SIZE)
    )
    seed: int = field(default=0, metadata=_spec("Seed for init, shuffling and everything else.", member=True, min=0))
    device: str = field(default="auto", metadata=_spec("auto (cuda if available), cpu, cuda or cuda:N.", hashed=False))
    precision: str = field(default="fp32", metadata=_spec(
        "Compute precision: fp32, fp64, or mixed (fp32 weights, autocast): bf16, or fp16 with a dynamic "
        "loss scale (GradScaler; fp16 runs are never trained together in an ensemble); tf32: fp32 with "
        "TF32 matmuls (CUDA, Ampere or newer; opt-in, never the default).", choices=PRECISIONS))
    log_every: int = field(default=0, metadata=_spec(
        "MLflow metric stride in steps (0: chosen from depth and steps, about 1,000 values a run; "
        "the artifacts keep every step).", member=True, hashed=False, min=0))

    def __post_init__(self) -> None:
        validate(self)
        # canonical form: a value that cannot affect the run is reset to its default, so that two
        # configurations that train the same numbers have the same hash (and run once)
        for name, unused in UNUSED_WHEN.items():
            if unused(self) and getattr(self, name) != FIELDS[name].default:
                object.__setattr__(self, name, FIELDS[name].default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace. Logged as config.json and hashed."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        """Identity of the run's numbers: the canonical JSON of every field but NOT_HASHED, and
        but the fields added since hashes were first stored (ADDED) while at their default: an MLP
        run keeps the hash it had before recurrent nets existed."""
        payload = {k: v for k, v in self.to_dict().items()
                   if k not in NOT_HASHED and not (k in ADDED and v == FIELDS[k].default)}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def weight_layers(self) -> int:
        """Weight layers L00...: the MLP's depth; a recurrent net's input U, recurrent W and classifier."""
        return self.depth if self.arch == "mlp" else 3

    @property
    def total_steps(self) -> int:
        """Optimizer steps this run will take (if it does not diverge)."""
        n_train = self.train_subset or MNIST_TRAIN_SIZE
        per_epoch = -(-n_train // self.batch_size)
        steps = per_epoch * self.epochs
        return min(steps, self.max_steps) if self.max_steps else steps


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RunConfig)}
# When a field cannot change what a run computes (then RunConfig resets it to its default)
def _inits(c: RunConfig) -> set[str]:
    """The init rules a configuration draws weights with (a recurrent net's W may have its own)."""
    return {c.init} | ({c.recurrent_init} if c.arch != "mlp" and c.recurrent_init != "same" else set())


UNUSED_WHEN = {
    "init_std": lambda c: "normal" not in _inits(c),
    "init_gain": lambda c: not _inits(c) - {"default", "normal", "identity"},
    "bias_std": lambda c: not _inits(c) - {"default"},
    "clip_threshold": lambda c: c.clip == "none",
    "residual_scale": lambda c: c.residual != "plain",
    "depth": lambda c: c.arch != "mlp",  # a recurrent net's depth is its sequence's length
    "sequence": lambda c: c.arch == "mlp",
    "recurrent_init": lambda c: c.arch == "mlp",
    "recurrent_gain": lambda c: c.arch == "mlp",
    "activation": lambda c: c.arch in ("lstm", "gru"),  # their gates' sigmoid and tanh are fixed
}
ADDED = ("arch", "sequence", "recurrent_init", "recurrent_gain")  # see RunConfig.config_hash
# Derived from the field metadata, never listed by hand:
NOT_HASHED = tuple(n for n, f in FIELDS.items() if not f.metadata["hashed"])
GROUP_KEYS = tuple(n for n, f in FIELDS.items() if not f.metadata["member"])  # what a group's members share


def pair_keys(*varied: str) -> list[str]:
    """The fields that make two runs "the same configuration but for `varied`" (e.g. clip and
    clip_threshold): every hashed field but those."""
    return [n for n, f in FIELDS.items() if f.metadata["hashed"] and n not in varied]


ADAM_KEYS = ("lr", "momentum")  # member fields for SGD (train.MemberSGD); one torch.optim.Adam for a group


def group_key(config: RunConfig) -> tuple:
    """Configs with equal keys can train together as members of one group (see train.py). Adam's lr
    and betas are shared by the group. fp16 runs train alone: the loss scaler skips a step for
    every member when one overflows."""
    key = tuple(getattr(config, k) for k in GROUP_KEYS)
    if config.optimizer == "adam":
        key += tuple(getattr(config, k) for k in ADAM_KEYS)
    return (*key, config.config_hash()) if config.precision == "fp16" else key


# The hashed fields that run_name does not spell out in its fixed part, each added as <tag><value>
# when not at its default, so that configurations that differ have different names.
NAME_TAGS = {"recurrent_gain": "rgain", "init_gain": "gain", "bias_std": "bias", "optimizer": "", "lr": "lr", "momentum": "mom", "batch_size": "b",
             "epochs": "ep", "max_steps": "steps", "train_subset": "n"}


def run_name(config: RunConfig) -> str:
    """A short human name for a run: activation, depth, width, init, clipping, [norm, residual,
    precision other than fp32, any other setting not at its default,] seed."""
    clip = "noclip" if config.clip == "none" else f"{config.clip}{config.clip_threshold:g}"
    init = f"normal{config.init_std:g}" if config.init == "normal" else config.init
    remedies = NORM_REGISTRY[config.norm].tag
    if config.residual == "plain":
        remedies += f"-res{config.residual_scale:g}"
    elif config.residual == "skipinit":
        remedies += "-skipinit"
    precision = "" if config.precision == "fp32" else f"-{config.precision}"
    others = "".join(f"-{tag}{_short(getattr(config, name))}" for name, tag in NAME_TAGS.items()
                     if getattr(config, name) != FIELDS[name].default)
    if config.arch == "mlp":
        net = f"{config.activation}-d{config.depth}"
    else:  # e.g. rnn-tanh-rows, lstm-pixels; W's init beside U's when it differs
        net = "-".join([config.arch] + ([config.activation] if config.arch == "rnn" else []) + [config.sequence])
        if config.recurrent_init != "same":
            init += f"-W{config.recurrent_init}"
    return f"{net}-w{config.width}-{init}-{clip}{remedies}{precision}{others}-s{config.seed}"


def state_activation(config: RunConfig) -> str:
    """The nonlinearity whose saturated or dead fraction a run records: the activation, but tanh for
    the gated cells (their candidate's; `activation` is unused there)."""
    return "tanh" if config.arch in ("lstm", "gru") else config.activation


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def validate(config: RunConfig) -> None:
    """Raise ConfigError naming the first field that breaks its constraint."""
    for name, f in FIELDS.items():
        value = getattr(config, name)
        _check_field(name, value, f.type, f.metadata)
    if not _DEVICE_RE.match(config.device):
        raise ConfigError("device", f"{config.device!r} is not one of auto, cpu, mps, cuda, cuda:N")
    if config.arch != "mlp":
        for name in ("norm", "residual"):
            if getattr(config, name) != "none":
                raise ConfigError(name, f"{getattr(config, name)!r} is for arch mlp: a recurrent net ({config.arch}) "
                                        "has no normalization or residual layers")
    norm = NORM_REGISTRY[config.norm]
    if norm.mixes_examples:  # its batch statistics are undefined for one example (a variance of 0)
        n_train = config.train_subset or MNIST_TRAIN_SIZE
        if config.batch_size < 2 or n_train % config.batch_size == 1:
            batch = "batch_size 1" if config.batch_size < 2 else (
                f"{n_train} training images in batches of {config.batch_size} leave a last batch of 1")
            raise ConfigError("batch_size", f"{norm.label} needs at least 2 examples in every batch: {batch}")


def _check_field(name: str, value: Any, type_name: str, meta: Any) -> None:
    expected = {"int": int, "float": (int, float), "str": str}[type_name]
    if isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(name, f"expected {type_name}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison, inf every gt
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(name, f"{value!r} is not one of {', '.join(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(name, f"must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(name, f"must be <= {meta['max']}, got {value!r}")
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(name, f"must be > {meta['gt']}, got {value!r}")
    if "lt" in meta and not value < meta["lt"]:
        raise ConfigError(name, f"must be < {meta['lt']}, got {value!r}")


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from plain values (YAML, JSON, MLflow params); unknown keys fail loudly."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown config key (known: {', '.join(FIELDS)})")
    return RunConfig(**{name: _coerce(name, value) for name, value in values.items()})


def _coerce(name: str, value: Any) -> Any:
    """YAML reads 1e-2 as a string and 1 as an int where a float is meant: accept both."""
    if FIELDS[name].type == "float" and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(name, f"expected float, got {value!r}") from None
    return value


SPEC_KEYS = ("name", "base", "axes", "exclude", "include", "seeds", "reproduces", "reduced")
PAPERS = ("glorot2010", "he2015", "pascanu2013", "pascanu2013_rnn", "le2015", "schoenholz2017", "yang2019", "he2016", "de2020", "pennington2017")  # report/papers.py


class SpecError(ValueError):
    """A grid spec that cannot be expanded; the message names the file and the key."""


@dataclass(frozen=True)
class GridSpec:
    """A study: `base` config, `axes` crossed, `exclude`/`include` for irregular grids, `seeds`.

        name: quick            # optional; defaults to the file name
        base: {epochs: 1, max_steps: 200}
        axes: {activation: [sigmoid, relu], init: [default, he_normal],
               clipping: [{clip: none}, {clip: norm, clip_threshold: 1.0}]}  # a mapping sets several keys
        exclude: [{activation: sigmoid, init: he_normal}]   # drop matching crossed configs
        include: [{activation: tanh, init: orthogonal}]     # extra configs (base + these keys)
        seeds: [0, 1, 2]       # or a count: 3 means seeds 0, 1, 2
        reproduces: he2015     # optional: the report compares with that paper's findings
        reduced: {max_steps: 300, seeds: 1}  # optional: `grid --reduced` runs this smaller budget
                                             # (base keys and seeds overridden) as grid <name>-reduced
    """

    name: str
    configs: tuple[RunConfig, ...]
    source: str  # the YAML text, logged with the grid's parent run
    reproduces: str | None = None  # a paper of PAPERS: the report sets its numbers beside ours

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256("".join(c.config_hash() for c in self.configs).encode()).hexdigest()[:16]

    @classmethod
    def from_yaml(cls, path: str | Path, reduced: bool = False) -> GridSpec:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if len(text) > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: {len(text):,} characters, over the limit of {MAX_SPEC_BYTES:,} for a spec")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise SpecError(f"{path}: not valid YAML ({exc})") from None
        if _values_over(raw, MAX_SPEC_VALUES):
            raise SpecError(f"{path}: more than {MAX_SPEC_VALUES:,} values once YAML aliases are followed "
                            "(an alias bomb?): write the grid with axes and seeds instead")
        try:
            check_name(raw, path.stem)
            if reduced:
                cls.from_dict(raw, default_name=path.stem)  # the whole spec first: errors name what the user wrote
                raw = reduce_spec(raw, default_name=path.stem)
                text = yaml.safe_dump(raw, sort_keys=False)  # what is logged must rebuild this grid
            return cls.from_dict(raw, default_name=path.stem, source=text)
        except ConfigError as exc:
            raise SpecError(f"{path}: {exc.key}: {exc.message}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], default_name: str = "grid", source: str = "") -> GridSpec:
        if not isinstance(raw, dict):
            raise ConfigError("spec", "the top level must be a mapping")
        for key in raw:
            if key not in SPEC_KEYS:
                raise ConfigError(key, f"unknown spec key (known: {', '.join(SPEC_KEYS)})")
        reduced = _mapping(raw, "reduced")
        for key in reduced:
            if key not in FIELDS and key != "seeds":
                raise ConfigError(f"reduced.{key}", "unknown config key (a base key or seeds)")
        base = _mapping(raw, "base")
        axes = _mapping(raw, "axes")
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"axes.{key}", "must be a non-empty list of values")
        seeds = raw.get("seeds", [base.get("seed", 0)])
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds > MAX_GRID_CONFIGS:
                raise ConfigError("seeds", f"{seeds:,} seeds is over the limit of {MAX_GRID_CONFIGS:,} configurations")
            seeds = list(range(seeds))
        if not isinstance(seeds, list) or not seeds:
            raise ConfigError("seeds", "must be a non-empty list of seeds or a count")
        planned = (math.prod(len(v) for v in axes.values()) + len(raw.get("include") or [])) * len(seeds)
        if planned > MAX_GRID_CONFIGS:
            raise ConfigError("axes", f"(axes crossed + include) x seeds = {planned:,} configurations, over the limit "
                                      f"of {MAX_GRID_CONFIGS:,}: split the study into several specs")
        reproduces = raw.get("reproduces")
        if reproduces is not None and reproduces not in PAPERS:
            raise ConfigError("reproduces", f"{reproduces!r} is not one of {', '.join(PAPERS)}")
        excludes = [_pattern(ex) for ex in _mappings(raw, "exclude")]
        crossed = [("axes", _combine(axes, values)) for values in itertools.product(*axes.values())]
        included = [(f"include[{j}]", c) for j, c in enumerate(_mappings(raw, "include"))]
        configs: dict[str, RunConfig] = {}
        for origin, combo in crossed + included:
            for seed in seeds:
                try:
                    config = from_dict({**base, **combo, "seed": seed})
                except ConfigError as exc:
                    where = "seeds" if exc.key == "seed" else f"{origin if exc.key in combo else 'base'}.{exc.key}"
                    raise ConfigError(where, exc.message) from None
                # exclude matches the validated configuration (defaults filled in, 1e-2 == 0.01)
                if origin == "axes" and any(_matches(config, ex) for ex in excludes):
                    continue
                configs.setdefault(config.config_hash(), config)
        if not (base or axes or raw.get("include")):
            raise ConfigError("spec", "is empty: give a base configuration, axes or include (see benchmarks/)")
        if not configs:
            raise ConfigError("axes", "the grid is empty (every configuration was excluded)")
        if reduced:  # the reduced budget is checked whether it is run now or not
            try:
                cls.from_dict(reduce_spec(raw, default_name), default_name)
            except ConfigError as exc:
                field = exc.key.removeprefix("base.")
                if exc.key.startswith("reduced."):
                    raise
                if field in reduced:
                    raise ConfigError(f"reduced.{field}", exc.message) from None
                raise ConfigError("reduced", f"with the reduced budget, {exc.key}: {exc.message}") from None
        source = source or yaml.safe_dump(raw, sort_keys=False)  # what is logged must rebuild this spec
        return cls(_name(raw, default_name), tuple(configs.values()), source, reproduces)


MAX_NAME = 200  # characters in a grid name


def _name(raw: dict, default: str) -> str:
    """The spec's name: a non-empty string (`name: null` made a grid called "None")."""
    name = raw.get("name", default)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("name", f"must be a non-empty string, got {name!r}")
    return name


def check_name(raw: Any, default: str) -> None:
    """What a spec file may name its grid (its file's name without a name: key). The name becomes
    the grid's MLflow run name, a tag and part of its report's file name: 1 to MAX_NAME printable
    characters, no path separator, not only dots (`name: ../../etc`, a control character or
    10,000 characters went through). Checked where a user's file is read, not where a stored
    spec is read back (a grid named before this rule must still report)."""
    if not isinstance(raw, dict):
        return
    name = _name(raw, default)
    given = "name" in raw
    where = "" if given else f"the spec's file name {name!r} is not a grid name: give a name: key ("
    close = "" if given else ")"
    if len(name) > MAX_NAME:
        raise ConfigError("name", f"{where}at most {MAX_NAME} characters, got {len(name):,}{close}")
    bad = sorted({c for c in name if not c.isprintable() or c in "/\\"})
    if bad:
        raise ConfigError("name", f"{where}no path separators or control characters, got {name!r} (with "
                                  f"{', '.join(repr(c) for c in bad)}){close}")
    if not name.strip("."):
        raise ConfigError("name", f"{where}not only dots, got {name!r}{close}")


def spec_origin(raw: Any, key: str, value: Any) -> str:
    """Where in a raw spec `key` got `value` (axes.<key>, include[j].<key>, reduced.<key>, base.<key>),
    for an error found after the spec was expanded (a device or precision this machine lacks)."""
    raw = raw if isinstance(raw, dict) else {}

    def has(mapping: Any) -> bool:
        return isinstance(mapping, dict) and mapping.get(key) == value

    for axis, values in (raw.get("axes") or {}).items() if isinstance(raw.get("axes"), dict) else []:
        if isinstance(values, list) and any(v == value if axis == key else has(v) for v in values):
            return f"axes.{axis}"
    for j, entry in enumerate(raw.get("include") or []) if isinstance(raw.get("include"), list) else []:
        if has(entry):
            return f"include[{j}].{key}"
    if has(raw.get("reduced")):
        return f"reduced.{key}"
    return f"base.{key}"


def _values_over(raw: Any, limit: int) -> bool:
    """Whether `raw` holds more than `limit` values, each alias counted again where it is used
    (stops counting at the limit: a billion laughs is not walked to the end)."""
    count, stack = 0, [raw]
    while stack:
        value = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def reduce_spec(raw: Any, default_name: str = "grid") -> dict[str, Any]:
    """The spec's `reduced:` budget applied: its keys override `base` (and `seeds`), the name gains
    '-reduced' (its own grid, its own report), and the result has no `reduced:` of its own."""
    if not isinstance(raw, dict):
        raise ConfigError("spec", "the top level must be a mapping")
    if not raw.get("reduced"):
        raise ConfigError("reduced", "this spec has no reduced: budget to run")
    overrides = dict(_mapping(raw, "reduced"))
    for key, value in overrides.items():  # each value checked here, so that an error names reduced.<key>
        if key in FIELDS:
            try:
                from_dict({key: value})
            except ConfigError as exc:
                raise ConfigError(f"reduced.{key}", exc.message) from None
    out = {k: v for k, v in raw.items() if k != "reduced"}
    if "seeds" in overrides:
        out["seeds"] = overrides.pop("seeds")
    out["base"] = {**_mapping(raw, "base"), **overrides}
    out["name"] = f"{_name(raw, default_name)}-reduced"
    return out


def _combine(axes: dict[str, list], values: tuple) -> dict[str, Any]:
    """One point of the crossed axes; a mapping value sets several keys together (clip + threshold)."""
    combo: dict[str, Any] = {}
    for key, value in zip(axes, values):
        combo.update(value if isinstance(value, dict) else {key: value})
    return combo


def _mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a mapping of config keys to values")
    return value


def _mappings(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(key, "must be a list of mappings of config keys to values")
    for entry in value:
        for k in entry:
            if k not in FIELDS:
                raise ConfigError(f"{key}.{k}", "unknown config key")
    return value


def _pattern(entry: dict[str, Any]) -> dict[str, list[Any]]:
    """An exclude entry with each value (or list of values) coerced as the field's values are."""
    try:
        return {k: [_coerce(k, v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in entry.items()}
    except ConfigError as exc:
        raise ConfigError(f"exclude.{exc.key}", exc.message) from None


def _matches(config: RunConfig, pattern: dict[str, list[Any]]) -> bool:
    """An exclude entry matches when every key it names has that value (or one of a list)."""
    return all(getattr(config, k) in values for k, values in pattern.items())
