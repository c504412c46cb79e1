"""`finetune(recipe)`: IdleViT's finetune of a converted model, single process (CPU or one GPU).

The student selects tokens with exactly the plan it is saved with (the official code trains with
blocks 4..11 idle and infers with 3..11). The teacher is the dense model with the starting weights,
frozen, in eval mode. The run folder ends as a vitidle model folder (`vitidle.load(OUT)`,
`vitidle export --onnx OUT`, `vitidle bench OUT`), with recipe.yaml and summary.csv beside it.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UsageError, VitidleError, first_line
from ..evaluate import accuracy
from ..idle import idle_selectors, keep_mask
from ..io import CONFIG, WEIGHTS, atomic_write, write_model
from .losses import finetune_loss, token_cut_loss
from .plot import plot_curves
from .recipe import ModelSection, Recipe

RUN_FILES = ("recipe.yaml", "summary.csv", "checkpoints")  # what marks a folder as a run folder `--force` may train into again
SUMMARY_FIELDS = ("epoch", "step", "lr", "images_per_s", "loss", "ce", "cut", "kd", "feature", "top1", "top5",
                  "teacher_top1", "seconds")


class NonFiniteLossError(VitidleError):
    """The loss became NaN or infinite: the message names the step and the term."""


# ---- the models ------------------------------------------------------------------------------------------------


@dataclass
class Built:
    """The student (converted, or with no idle layer for a dense run), the teacher, and what they came from."""

    student: nn.Module
    teacher: nn.Module | None
    base_model: str
    model_kwargs: dict
    weights: str | None
    plan_text: str
    num_idle: int
    notes: list[str] = field(default_factory=list)


def build_models(recipe: Recipe, *, meta: bool = False) -> Built:
    """The student and (if `recipe.teacher.enabled`) the teacher. `meta=True`: shapes only, no weights, no download.

    >>> from vitidle.train.recipe import recipe_from_dict
    >>> r = recipe_from_dict({"model": {"name": "deit_small", "keep": 0.7}, "data": {"root": "x"}})
    >>> build_models(r, meta=True).plan_text
    'blocks 3-5: 0.7 (137), 6-8: 0.49 (96), 9-11: 0.343 (67) [block: keep (image tokens kept)]'
    """
    import timm

    import vitidle

    from ..engine import IdlePlan, discover, make_plan
    from ..io import WEIGHTS, read_config
    from ..models import check_model_kwargs, create, resolve_name

    spec: ModelSection = recipe.model
    num_keep = None
    if spec.folder is not None:
        config = read_config(spec.folder)
        name, kwargs = config["base_model"], dict(config.get("model_kwargs") or {})
        weights, pretrained = str(Path(spec.folder) / WEIGHTS), False
        if spec.keep is None and spec.plan is None:
            num_keep = config["plan"].get("num_keep")
    else:
        name, kwargs, weights, pretrained = resolve_name(spec.name), dict(spec.model_kwargs), spec.weights, spec.pretrained
    kwargs.pop("drop_path_rate", None)  # a training setting: the recipe's model.drop_path decides it
    train_kwargs = {**kwargs, **({"drop_path_rate": spec.drop_path} if spec.drop_path else {})}
    notes = []
    if meta:
        try:
            with torch.device("meta"):
                dense = timm.create_model(resolve_name(name), pretrained=False, **check_model_kwargs(train_kwargs))
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"cannot build {name} with {train_kwargs}: {type(e).__name__}: {first_line(e)}") from None
        if weights is not None and not Path(weights).is_file():
            notes.append(f"weights {weights} not found yet (needed to train)")
    else:
        dense = create(name, pretrained=pretrained, weights=weights, **train_kwargs)
    teacher = None
    if recipe.teacher.enabled and not meta:
        teacher = copy.deepcopy(dense).eval().requires_grad_(False)  # the starting weights, frozen
    depth = len(discover(dense).blocks)
    if spec.dense:
        plan = IdlePlan((None,) * depth)
    elif spec.folder is not None and spec.keep is None and spec.plan is None:
        plan = IdlePlan(tuple(read_config(spec.folder)["plan"]["keep"]))
    else:
        plan = make_plan(depth, 0.7 if spec.keep is None else spec.keep, spec.schedule, spec.plan)
    # the kwargs the model was built with, drop path included: `save` checks that they rebuild its modules
    student = vitidle.convert(dense, plan=plan, model_kwargs=train_kwargs)
    if num_keep is not None:  # a folder's own token counts (a knob may have been changed after conversion)
        for block, k in zip(student.vitidle_config["layout"]["blocks"], num_keep):
            if k is not None:
                student.get_submodule(block).selector.num_keep = int(k)
    layout = student.vitidle_config["layout"]
    selectors = idle_selectors(student)
    plan_text = "dense: no idle layer" if not selectors else IdlePlan(plan.keep).describe(
        layout["num_tokens"] - layout["num_prefix"])
    if num_keep is not None:
        plan_text += f"; tokens kept per block {num_keep}"
    return Built(student, teacher, student.vitidle_config["base_model"], train_kwargs, weights, plan_text,
                 len(selectors), notes)


def describe(recipe: Recipe, built: Built, world: int = 1) -> list[tuple[str, str]]:
    """Rows for `--dry-run` and the start of a run (`world`: processes under torchrun)."""
    global_batch = recipe.run.batch_size * recipe.run.accumulation * world
    lr = peak_lr(recipe, world)
    params = sum(p.numel() for p in built.student.parameters())
    length = f"{recipe.run.epochs} epochs" if recipe.run.epochs else f"{recipe.run.steps} steps"
    rows = [
        ("model", f"{built.base_model} {built.model_kwargs or ''}".strip()),
        ("weights", built.weights or ("timm pretrained" if recipe.model.pretrained else "random init")),
        ("parameters", f"{params / 1e6:.2f} M"),
        ("plan", built.plan_text),
        ("teacher", "dense model with the starting weights (frozen)" if recipe.teacher.enabled else "off"),
        ("loss", loss_text(recipe, built.num_idle)),
        ("data", f"{recipe.data.dataset} {recipe.data.root or ''}".strip()),
        ("optimizer", f"AdamW lr {lr:.3g} "
                      + (f"(base {recipe.optim.lr:g} x {global_batch}/512)" if recipe.optim.scale_lr else
                         "(optim.scale_lr false: as given)")
                      + f", cosine to {recipe.optim.min_lr:g}, wd {recipe.optim.weight_decay:g}"
                      + (f", warmup {recipe.optim.warmup_epochs:g} epochs" if recipe.optim.warmup_epochs else "")
                      + (f", clip {recipe.optim.clip_grad:g}" if recipe.optim.clip_grad else "")),
        ("run", f"{length}, global batch {global_batch} ({recipe.run.batch_size} x {recipe.run.accumulation}"
                + (f" x {world} processes" if world > 1 else "") + "), "
                f"{recipe.run.precision}, device {recipe.run.device}"),
        ("output", f"{recipe.run.output}/"),
    ]
    return rows + [("note", n) for n in built.notes]


def loss_text(recipe: Recipe, num_idle: int) -> str:
    terms = ["CE" + (" (mixup soft targets)" if recipe.data.mixing else "")]
    if num_idle and recipe.loss.cut != "none" and recipe.loss.lambda_cut:
        terms.append(f"{recipe.loss.lambda_cut:g} * cut[{recipe.loss.cut}] / {num_idle}")
    if recipe.teacher.enabled and recipe.loss.lambda_kd:
        terms.append(f"{recipe.loss.lambda_kd:g} * KL + {100 * recipe.loss.lambda_kd:g} * feature MSE")
    return " + ".join(terms)


# ---- schedule ------------------------------------------------------------------------------------------------------


def peak_lr(recipe: Recipe, world: int = 1) -> float:
    """The lr after warmup: `optim.lr` × global batch / 512 (`scale_lr`), as DeiT and IdleViT scale it."""
    global_batch = recipe.run.batch_size * recipe.run.accumulation * world
    return recipe.optim.lr * global_batch / 512 if recipe.optim.scale_lr else recipe.optim.lr


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float, warmup_lr: float) -> float:
    """Linear warmup from `warmup_lr` over `warmup` steps, then cosine from `peak` to `min_lr` at `total`.

    >>> [round(lr_at(s, 4, 0, 1.0, 0.0, 0.0), 3) for s in range(4)]
    [1.0, 0.854, 0.5, 0.146]
    """
    if step < warmup:
        return warmup_lr + (peak - warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, frozen: list[str]) -> list[dict]:
    """AdamW groups: decay on weight matrices, none on biases, norms and timm's `no_weight_decay()` names."""
    names = {n for n, _ in model.named_parameters()}
    unknown = [f for f in frozen if f not in names]
    if unknown:
        raise UsageError(f"optim.frozen: no parameter named {', '.join(unknown)} in the model")
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)  # IdleViT freezes the class token and position embedding
            continue
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- files ---------------------------------------------------------------------------------------------------------


def check_output(folder: Path, force: bool, remove: bool = True) -> None:
    """Refuse a folder that holds files unless `force` and it is a run folder (recipe.yaml or summary.csv).

    `force` trains again into it: recipe.yaml, summary.csv and the model files are replaced and the
    old run's checkpoints removed; other files are left where they are.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"run.output {folder} is a file; give a folder")
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not force:
        raise UsageError(f"run.output {folder} already exists and is not empty; choose another run.output "
                         "(--set run.output=...) or pass --force to train into it again")
    if not any((folder / f).exists() for f in RUN_FILES):
        raise UsageError(f"run.output {folder} holds files but is no run folder (no recipe.yaml); --force only "
                         "reuses run folders: choose another run.output")
    from .checkpoint import checkpoints

    if not remove:
        return
    for old in checkpoints(folder):  # the old run's: a later --resume must not pick them up
        shutil.rmtree(old)
    for name in (CONFIG, WEIGHTS, "summary.csv", "curves.png"):  # the config first: no longer a model folder
        (folder / name).unlink(missing_ok=True)


def write_summary(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, buffer.getvalue().encode())


# ---- training ------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PreLogits:
    """Keeps the input of the model's classifier (the class-token / pooled features, B × C) at each forward."""

    def __init__(self, model: nn.Module):
        self.value: Tensor | None = None
        head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
        if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
            raise UsageError("distillation needs a model with a classification head (num_classes > 0)")
        head.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = inputs[0]


def finetune(recipe: Recipe, *, force: bool = False, resume: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> Path:
    """Train `recipe` and return its run folder, a vitidle model folder with recipe.yaml and summary.csv.

    `resume=True` continues the run in `run.output` from its newest checkpoint, exactly (on CPU the
    final weights are bit-identical to an uninterrupted run). SIGTERM or Ctrl-C saves a checkpoint
    at the next step and raises KeyboardInterrupt. Under torchrun each process trains on its shard
    of every global batch (run.batch_size images per process), and rank 0 logs and writes.

    >>> out = finetune(load_recipe("recipes/fashion_mnist/keep0.7.yaml"))   # doctest: +SKIP
    >>> vitidle.load(out)                                                      # doctest: +SKIP
    """
    from . import distributed

    out = Path(recipe.run.output)
    group = distributed.setup(recipe.run.device)
    try:
        return _finetune(recipe, out, group, force, resume, progress, log)
    finally:
        distributed.teardown(group)


def _finetune(recipe: Recipe, out: Path, group, force: bool, resume: bool, progress: bool,
              log: Callable[[str], None]) -> Path:
    import yaml
    from torch.utils.data import DataLoader

    from . import distributed
    from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
    from .data import EpochSampler, build_datasets, mixup_fn, normalisation

    run, device = recipe.run, group.device
    if not group.main:
        log, progress = (lambda text: None), False
    latest = check_resume(out, recipe) if resume else check_output(out, force, remove=group.main)  # before any work
    distributed.barrier(group)
    seed_everything(run.seed)  # the same on every process: the same random init, teacher included
    built = build_models(recipe)
    student, teacher = built.student.to(device), built.teacher
    if group.world > 1:
        seed_everything(run.seed + group.rank)  # each process its own mixup, drop path, ...
    train_ds, val_ds = build_datasets(recipe.data, student.vitidle_config["input"], run.seed)
    num_classes = getattr(student, "num_classes", None)
    ds_classes = getattr(train_ds, "num_classes", None)
    if ds_classes and num_classes and ds_classes > num_classes:
        raise UsageError(f"the dataset has {ds_classes} classes but the model {num_classes}: "
                         f"set model.model_kwargs.num_classes={ds_classes}")
    sampler = EpochSampler(len(train_ds), run.seed, group.rank, group.world)
    # own generators: creating a loader's iterator must not draw from the global RNG (a resume creates it elsewhere)
    common = dict(batch_size=run.batch_size, num_workers=run.num_workers, pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_ds, sampler=sampler, drop_last=True, generator=torch.Generator(), **common)
    val_loader = DataLoader(val_ds, sampler=range(group.rank, len(val_ds), group.world), generator=torch.Generator(),
                            **common)  # each process a shard; `accuracy` sums the counts
    steps_per_epoch = len(train_ds) // (run.batch_size * run.accumulation * group.world)
    if steps_per_epoch == 0:
        raise UsageError(f"the training set ({len(train_ds)} images) is smaller than one step "
                         f"(run.batch_size {run.batch_size} x run.accumulation {run.accumulation} x "
                         f"{group.world} processes)")
    total_steps = run.steps or run.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = round(recipe.optim.warmup_epochs * steps_per_epoch)
    peak = peak_lr(recipe, group.world)

    optimizer = torch.optim.AdamW(param_groups(student, recipe.optim.weight_decay, recipe.optim.frozen), lr=peak,
                                  betas=tuple(recipe.optim.betas), eps=recipe.optim.eps)
    # gradients averaged over the processes; `student` stays the model itself (selectors, saving)
    trained = nn.parallel.DistributedDataParallel(student) if group.world > 1 else student
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[run.precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")
    mixup = mixup_fn(recipe.data, num_classes or ds_classes or 1000)

    selectors = idle_selectors(student)
    use_cut = bool(selectors) and recipe.loss.cut != "none" and recipe.loss.lambda_cut > 0
    for s in selectors:
        s.record_attention = use_cut  # costs q, k of every token: only when the cut loss needs the logits
    distill = teacher is not None and recipe.loss.lambda_kd > 0
    student_features = teacher_features = None
    if distill:
        teacher = teacher.to(device)
        student_features, teacher_features = PreLogits(student), PreLogits(teacher)

    for key, value in describe(recipe, built, group.world):
        log(f"{key:<12}{value}")
    # where the run stands; a checkpoint replaces it
    at = {"step": 0, "epoch": 1, "micro": 0, "images": 0, "seconds": 0.0, "rows": [], "teacher_top1": None,
          "sums": dict.fromkeys(("loss", "ce", "cut", "kd", "feature"), 0.0)}
    if latest is not None:
        weights, at = load_checkpoint(latest)
        student.load_state_dict({k: v.to(device) for k, v in weights.items()})
        optimizer.load_state_dict(at.pop("optimizer"))
        if scaler.is_enabled():
            scaler.load_state_dict(at.pop("scaler"))
        states = at.pop("rng")
        states = [states] if isinstance(states, dict) else states  # one per process
        if len(states) != group.world:
            raise UsageError(f"--resume: the run was checkpointed by {len(states)} process(es); resume it with as "
                             f"many (torchrun --nproc_per_node {len(states)})")
        set_rng_state(states[group.rank])
        log(f"resume      from {latest} (step {at['step']} of {total_steps})")
    else:
        if group.main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode())
        if teacher is not None:
            at["teacher_top1"] = accuracy(teacher, val_loader, device, autocast)[0]
    if at["teacher_top1"] is not None:
        log(f"teacher     top-1 {at['teacher_top1']:.2f}% (the dense model, before training)")

    def checkpoint() -> None:
        states = distributed.gather(rng_state(), group)
        if not group.main:
            return
        state = {**at, "optimizer": optimizer.state_dict(), "rng": states if group.world > 1 else states[0],
                 "total_steps": total_steps}
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        save_checkpoint(out, at["step"], student, state)

    stop = _StopSignal()
    bar = _progress(total_steps, progress, at["step"])
    student.train()
    try:
        while at["step"] < total_steps:
            epoch = at["epoch"]
            train_ds.transformed.epoch = epoch
            sampler.set_epoch(epoch, start=at["micro"] * run.batch_size)
            start = time.perf_counter() - at["seconds"]
            optimizer.zero_grad(set_to_none=True)
            for x, y in train_loader:
                if at["step"] >= total_steps or at["micro"] >= steps_per_epoch * run.accumulation:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mixup is not None:
                    x, y = mixup(x, y)
                syncing = (at["micro"] + 1) % run.accumulation == 0  # DDP averages gradients at the step's end
                with autocast(), (nullcontext() if syncing or group.world == 1 else trained.no_sync()):
                    logits = trained(x)
                    t_logits = t_feats = None
                    if distill:
                        with torch.no_grad():
                            t_logits = teacher(x)
                            t_feats = teacher_features.value
                    cuts = []
                    if use_cut:
                        for s in selectors:
                            logits_nn = s.attention_logits  # B, N, N
                            cuts.append(token_cut_loss(logits_nn, keep_mask(s, logits_nn.shape[-1]), recipe.loss.cut))
                            s.attention_logits = None  # the loss holds the graph; drop the module's reference
                    terms = finetune_loss(
                        logits, y, cut_losses=cuts, num_idle=len(selectors),
                        features=student_features.value if distill else None, teacher_logits=t_logits,
                        teacher_features=t_feats, lambda_cut=recipe.loss.lambda_cut if use_cut else 0.0,
                        lambda_kd=recipe.loss.lambda_kd if distill else 0.0,
                        label_smoothing=recipe.data.label_smoothing)
                # every process takes the step's stop decision from this one reduction: a signal that lands on
                # one process later in the step waits for the next, so all run the same collectives
                values, stop_now = distributed.reduce_step({k: v.item() for k, v in terms.items()}, stop.requested,
                                                           group)
                if not math.isfinite(values["total"]):
                    bad = next((k for k in ("ce", "cut", "kd", "feature") if not math.isfinite(values[k])), "total")
                    raise NonFiniteLossError(
                        f"the loss is not finite at step {at['step'] + 1} (epoch {epoch}): term {bad} = {values[bad]}; "
                        "lower optim.lr or use run.precision fp32; the last checkpoint is kept")
                with nullcontext() if syncing or group.world == 1 else trained.no_sync():
                    scaler.scale(terms["total"] / run.accumulation).backward()
                for k in at["sums"]:
                    at["sums"][k] += values["total" if k == "loss" else k]
                at["micro"] += 1
                at["images"] += len(x) * group.world
                if at["micro"] % run.accumulation:
                    continue
                lr = lr_at(at["step"], total_steps, warmup, peak, recipe.optim.min_lr, recipe.optim.warmup_lr)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                if recipe.optim.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(student.parameters(), recipe.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                at["step"] += 1
                at["seconds"] = time.perf_counter() - start
                bar.update(at["step"], epoch, epochs, values["total"], lr, at["images"] / at["seconds"])
                epoch_end = at["micro"] >= steps_per_epoch * run.accumulation or at["step"] >= total_steps
                if not epoch_end and (stop_now or (run.checkpoint_every
                                                         and at["step"] % run.checkpoint_every == 0)):
                    checkpoint()
                if stop_now:
                    raise KeyboardInterrupt
            last = at["step"] >= total_steps
            micro = max(at["micro"], 1)
            row = {"epoch": epoch, "step": at["step"], "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": at["images"] / max(at["seconds"], 1e-9), "seconds": at["seconds"],
                   **{k: v / micro for k, v in at["sums"].items()}, "teacher_top1": at["teacher_top1"]}
            if last or (run.eval_every and epoch % run.eval_every == 0):
                row["top1"], row["top5"], _ = accuracy(student, val_loader, device, autocast)
            at["rows"].append(row)
            if group.main:
                write_summary(out / "summary.csv", at["rows"])
                plot_curves(at["rows"], out / "curves.png")
            at.update(epoch=epoch + 1, micro=0, images=0, seconds=0.0, sums=dict.fromkeys(at["sums"], 0.0))
            _, stop_now = distributed.reduce_step({}, stop.requested, group)  # a signal during eval or writing
            checkpoint()
            if stop_now:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        log(f"stopped at step {at['step']}: checkpoint in {out / 'checkpoints'}; continue with --resume")
        raise
    finally:
        stop.restore()
    bar.close()
    for s in selectors:
        s.record_attention = False
    # the preprocessing it was trained with, for eval, export and bench (the recipe may set its own mean / std)
    config = student.vitidle_config["input"]
    mean, std = normalisation(recipe.data, config, config["input_size"][0])
    config.update(mean=list(mean), std=list(std))
    if group.main:
        write_model(student.eval(), out)  # model files beside the recipe, summary and checkpoints
    distributed.barrier(group)
    log(table(at["rows"]))
    log(f"model       {out}/ (vitidle.load, vitidle export --onnx {out})")
    return out


class _StopSignal:
    """SIGTERM / SIGINT ask for a checkpoint at the next step boundary; a second one stops at once."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_resume(out: Path, recipe: Recipe) -> Path:
    """The newest checkpoint of the run in `out`, if `recipe` is the run's own recipe; else UsageError."""
    import yaml

    from .checkpoint import checkpoints

    saved_path = out / "recipe.yaml"
    if not saved_path.is_file():
        raise UsageError(f"--resume: {out} holds no run (no recipe.yaml); start it without --resume")
    found = checkpoints(out)
    if not found:
        raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'} yet; start the run again with --force")
    saved = yaml.safe_load(saved_path.read_text())
    mine = recipe.to_dict()
    free = {("run", "num_workers"), ("run", "log_every"), ("run", "device")}  # do not change the result on CPU
    changed = [f"{section}.{key}" for section in mine for key in mine[section]
               if (section, key) not in free and saved.get(section, {}).get(key) != mine[section][key]]
    if changed:
        raise UsageError(f"--resume: the recipe differs from the run's recipe.yaml in {', '.join(changed)}; "
                         f"resume with {saved_path}")
    return found[-1]


def table(rows: list[dict]) -> str:
    """The per-epoch summary as a small text table."""
    head = f"{'epoch':>5} {'step':>7} {'loss':>8} {'ce':>7} {'cut':>7} {'kd':>7} {'top-1':>7} {'top-5':>7} " \
           f"{'lr':>9} {'img/s':>7}"
    lines = [head]
    for r in rows:
        top1 = f"{r['top1']:7.2f}" if r.get("top1") is not None else f"{'-':>7}"
        top5 = f"{r['top5']:7.2f}" if r.get("top5") is not None else f"{'-':>7}"
        lines.append(f"{r['epoch']:>5} {r['step']:>7} {r['loss']:8.4f} {r['ce']:7.4f} {r['cut']:7.4f} "
                     f"{r['kd']:7.4f} {top1} {top5} {r['lr']:9.3g} {r['images_per_s']:7.1f}")
    return "\n".join(lines)


class _progress:
    """A tqdm bar with rate and ETA on a terminal; plain lines every few percent otherwise."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.initial = initial
        self.every = max(1, total // 20)
        self.start = time.perf_counter()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, epoch: int, epochs: int, loss: float, lr: float, rate: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}/{epochs}", refresh=False)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step - self.initial, 1) * (self.total - step)
            print(f"step {step}/{self.total} epoch {epoch}/{epochs} loss {loss:.4f} lr {lr:.3g} "
                  f"{rate:.0f} img/s eta {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
