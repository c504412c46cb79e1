"""The finetune recipe: a YAML file validated by pydantic, overridable with `--set section.key=value`.

A bad recipe raises `RecipeError` (exit 2) with one line per bad field, e.g. `optim.lr: must be > 0`;
an unknown key names the nearest valid one. `vitidle finetune --schema` prints the JSON schema
(committed as docs/recipe.schema.json, for editors).

>>> r = recipe_from_dict({"model": {"name": "deit_tiny"}, "data": {"root": "imgs"}}, ["optim.lr=2e-5"])
>>> r.optim.lr, r.loss.lambda_cut, r.run.precision
(2e-05, 20.0, 'fp32')
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UsageError

DENSE = "none"  # `model.plan: none`: no idle layer (a dense run, e.g. a pretrain from scratch)
TRAINING_KWARGS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate")


class RecipeError(UsageError):
    """A recipe that does not validate: one line per bad field, `path: why`."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    """What to finetune: a converted model folder, or a timm model converted on the fly."""

    folder: str | None = Field(None, description="A vitidle model folder (plan and weights from it). Or give `name`.")
    name: str | None = Field(None, description="timm name or vitidle alias (deit_small), converted on the fly.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to timm.create_model (with `name`).")
    weights: str | None = Field(None, description="Starting weights (.safetensors/.pth) for `name`; dense or converted.")
    pretrained: bool = Field(False, description="With `name` and no `weights`: timm's pretrained weights (download).")
    keep: float | None = Field(None, gt=0, le=1, description="Keep ratio r of the plan (default 0.7; a folder's own "
                                                             "plan if unset). keep 1.0 = dense (no idle layer).")
    schedule: Literal["idlevit", "constant"] = "idlevit"
    plan: str | None = Field(None, description="Explicit plan '3-5:0.7,6-11:0.5', or 'none' for a dense run.")
    drop_path: float = Field(0.0, ge=0, lt=1, description="Stochastic depth rate (timm's drop_path_rate).")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.folder is None) == (self.name is None):
            raise ValueError("give exactly one of model.folder (a converted model) and model.name (a timm model)")
        if self.folder is not None and (self.model_kwargs or self.weights or self.pretrained):
            raise ValueError("model.model_kwargs, model.weights and model.pretrained apply to model.name, "
                             "not to a model folder")
        if self.plan is not None and self.keep is not None:
            raise ValueError("give model.keep or model.plan, not both")
        clash = set(self.model_kwargs) & {"drop_path_rate"}
        if clash:
            raise ValueError("set drop path with model.drop_path, not model.model_kwargs.drop_path_rate")
        return self

    @property
    def dense(self) -> bool:
        return (self.plan or "").strip().lower() == DENSE or self.keep == 1.0


class TeacherSection(Section):
    """Distillation from the dense model with the starting weights (frozen, eval mode)."""

    enabled: bool = True


class DataSection(Section):
    """The data, through timm.data; input size and normalisation from the model's data config."""

    dataset: str = Field("folder", description="'folder' (an image folder: ROOT/train, ROOT/validation or ROOT "
                                               "itself), 'fashion_mnist' (Debian's files), or a timm.data name "
                                               "(torch/cifar10, hfds/..., ...).")
    root: str | None = Field(None, description="Dataset folder (fashion_mnist: /usr/share/datasets/fashion-mnist).")
    train_split: str = "train"
    val_split: str = "validation"
    download: bool = Field(False, description="Let torchvision / HF datasets download (online only).")
    train_limit: int | None = Field(None, gt=0, description="Use only the first N training images (quick runs).")
    val_limit: int | None = Field(None, gt=0, description="Evaluate on the first N validation images.")
    mean: list[float] | None = Field(None, description="Normalisation mean, one per channel (default: model's).")
    std: list[float] | None = Field(None, description="Normalisation std, one per channel (default: model's).")
    scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range.")
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.3, ge=0)
    auto_augment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm auto-augment string (RandAugment); "
                                                                         "null for none.")
    reprob: float = Field(0.25, ge=0, le=1, description="Random erasing probability.")
    mixup: float = Field(0.8, ge=0, description="Mixup alpha (0: off).")
    cutmix: float = Field(1.0, ge=0, description="CutMix alpha (0: off).")
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _root(self) -> DataSection:
        if self.dataset == "folder" and not self.root:
            raise ValueError("data.root: an image folder dataset needs a root folder")
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1] or self.scale[1] > 1:
            raise ValueError("data.scale: must be [low, high] with 0 < low <= high <= 1")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and (not values or (name == "std" and min(values) <= 0)):
                raise ValueError(f"data.{name}: must be a non-empty list" + (" of numbers > 0" if name == "std" else ""))
        return self

    @property
    def mixing(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


class LossSection(Section):
    """CE + λ_cut · L_cut / #idle layers + λ_kd · KL(teacher ‖ student) + 100 · λ_kd · MSE(features)."""

    lambda_cut: float = Field(20.0, ge=0, description="Token cut loss weight (the paper: 20).")
    lambda_kd: float = Field(10.0, ge=0, description="Distillation weight (the paper: 10; needs the teacher).")
    cut: Literal["both", "intra", "inter", "none"] = "both"


class OptimSection(Section):
    """AdamW with a per-step cosine schedule to `min_lr`, after an optional linear warmup.

    `lr` is the base learning rate for a global batch of 512: the run uses lr × global batch / 512
    (global batch = run.batch_size × run.accumulation) when `scale_lr` is true. `min_lr` and
    `warmup_lr` are used as given (not scaled), as in DeiT.
    """

    lr: float = Field(1e-5, gt=0, description="Base lr per 512 images of global batch (see scale_lr).")
    scale_lr: bool = True
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float | None = Field(None, gt=0, description="Max global grad norm; null: no clipping.")
    frozen: list[str] = Field(["cls_token", "pos_embed"], description="Parameters not trained (IdleViT freezes "
                                                                      "these; a pretrain from scratch: []).")

    @model_validator(mode="after")
    def _betas(self) -> OptimSection:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("optim.betas: each must be in [0, 1)")
        return self


class RunSection(Section):
    """How long, how big, where: `epochs` or `steps` (optimizer steps), exactly one."""

    epochs: int | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0, description="Optimizer steps (each of batch_size × accumulation images).")
    batch_size: int = Field(64, gt=0, description="Images per forward.")
    accumulation: int = Field(1, gt=0, description="Forwards per optimizer step.")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N.")
    output: str = Field("runs/finetune", description="Run folder: recipe.yaml, summary.csv, the final model.")
    eval_every: int = Field(1, ge=0, description="Evaluate every N epochs and at the end (0: only at the end).")
    checkpoint_every: int = Field(0, ge=0, description="Optimizer steps between checkpoints, besides the one at "
                                                        "each epoch's end (0: epoch ends only).")
    num_workers: int = Field(2, ge=0)
    log_every: int = Field(50, gt=0, description="Steps between progress updates of the loss.")

    @model_validator(mode="after")
    def _length(self) -> RunSection:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("run: give exactly one of run.epochs and run.steps")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"run.device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


class Recipe(Section):
    """A finetune: model, teacher, data, loss, optim, run. See docs/finetune.md."""

    model: ModelSection
    teacher: TeacherSection = TeacherSection()
    data: DataSection
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    run: RunSection = RunSection(epochs=30)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.data.mixing and self.run.batch_size % 2:
            raise ValueError("run.batch_size: mixup / cutmix need an even batch size")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# ---- reading and errors ------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (`yaml.safe_load`), apply `--set` overrides, validate. Raises `RecipeError`.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "r.yaml"
    >>> _ = p.write_text("model: {name: deit_tiny}\\ndata: {root: imgs}\\noptim: {lr: -1}\\n")
    >>> load_recipe(p)
    Traceback (most recent call last):
    vitidle.train.recipe.RecipeError: invalid recipe r.yaml: optim.lr: must be > 0 (got -1)
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise RecipeError(f"{path} is not valid YAML{where}: {problem}") from None
    return recipe_from_dict(data, overrides, source=path.name)


def recipe_from_dict(data: Any, overrides: list[str] | tuple[str, ...] = (), source: str = "recipe") -> Recipe:
    """Validate a parsed recipe after applying `overrides` ("section.key=value", value read as YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections (model, data, ...), got {_kind(data)}")
    data = apply_overrides(data, overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = sorted(dict.fromkeys(_describe(err) for err in e.errors()))
        head = f"invalid recipe {source}" + (f" ({len(lines)} errors):\n" if len(lines) > 1 else ": ")
        raise RecipeError(head + "\n".join(lines)) from None


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of `data` with each "a.b.c=value" set (value parsed with yaml.safe_load)."""
    import copy

    import yaml

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RecipeError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. optim.lr=2e-5")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text  # a plain string: validation says whether it fits
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section ({_kind(child)})")
            node = child
        node[parts[-1]] = value
    return data


MESSAGES = {
    "missing": "required",
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number", "float_parsing": "must be a number", "finite_number": "must be a finite number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list", "tuple_type": "must be a list",
    "dict_type": "must be a mapping", "model_type": "must be a mapping", "model_attributes_type": "must be a mapping",
}
BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _describe(err: dict) -> str:
    """One line for one pydantic error: `path: why (got value)`."""
    loc = [str(p) for p in err["loc"]]
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        valid = _keys_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join(loc[:-1] + close)}?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{'.'.join(loc)}: unknown key{hint}"
    if kind == "value_error":  # our validators: the message names its own field
        msg = str(ctx.get("error", err["msg"]))
        return msg if ":" in msg.split(" ")[0] else (f"{'.'.join(loc)}: {msg}" if loc else msg)
    if kind in BOUNDS:
        op, bound = BOUNDS[kind], next(iter(ctx.values()))
        why = f"must be {op} {bound:g}" if isinstance(bound, (int, float)) else f"must be {op} {bound}"
    elif kind == "literal_error":
        why = f"must be one of {ctx.get('expected', '')}".replace("'", "")
    elif kind in ("too_short", "too_long"):
        why = f"must have {ctx.get('min_length', ctx.get('max_length'))} items" if kind == "too_short" else \
            f"must have at most {ctx.get('max_length')} items"
        if loc and loc[-1] in ("scale", "betas"):
            why = "must be a list of 2 numbers"
    elif kind == "missing" and any(p.isdigit() for p in loc):  # a tuple too short
        why, kind = "must be a list of 2 numbers", "too_short"
    else:
        why = MESSAGES.get(kind, err["msg"].lower())
    got = "" if kind in ("missing", "too_short") else f" (got {_short(err.get('input'))})"
    # pydantic appends a tuple's item index / a union's member: name the field the user wrote
    path = ".".join(p for p in loc if not p.isdigit() and p not in ("float", "int", "str", "none", "list[float]")) or \
        "recipe"
    return f"{path}: {why}{got}"


def _keys_at(loc: list[str]) -> list[str]:
    """The valid keys of the section at `loc` (for the unknown-key hint)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__)


def schema() -> dict:
    """The recipe's JSON schema (docs/recipe.schema.json)."""
    out = Recipe.model_json_schema()
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = "vitidle finetune recipe"
    return out


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"
