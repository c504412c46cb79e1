"""`vitidle` commands. Heavy imports live inside the commands so that `--help` is instant."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .finetune import finetune

KEEP = click.FloatRange(0.0, 1.0, min_open=True)


def _parse_model_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE (e.g. img_size=64)", param_hint="--model-arg")
        out[key] = yaml.safe_load(value)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitidle")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def cli(debug: bool) -> None:
    """Dynamic token idling (IdleViT) for pretrained Vision Transformers."""


cli.add_command(finetune)

CONVERSION_PARAMS = ("keep", "schedule", "plan_text", "weights", "no_pretrained", "model_arg")


def conversion_options(required: bool):
    """--model and the options that say how to create and convert it (convert, and bench on the fly)."""
    options = [
        click.option("--model", "-m", "model_name", required=required,
                     help="timm name or alias: deit_tiny, deit_small, deit_base, vit_small, deit3_small, ..."),
        click.option("--keep", type=KEEP, default=0.7, show_default=True,
                     help="Keep ratio r: fraction of image tokens each idle block runs on (0 < r <= 1)."),
        click.option("--schedule", type=click.Choice(["idlevit", "constant"]), default="idlevit", show_default=True,
                     help="idlevit: first quarter of the blocks dense, then three stages at r, r², r³. "
                          "constant: r at every block after the first quarter."),
        click.option("--plan", "plan_text", metavar="BLOCKS:KEEP,...",
                     help="Explicit per-block plan instead of --keep/--schedule, e.g. '3-5:0.7,6-8:0.49,9-11:0.343' "
                          "(0-indexed blocks; unlisted blocks stay dense)."),
        click.option("--weights", type=click.Path(dir_okay=False),
                     help="Local weights: .safetensors, or .pth/.bin (loaded with weights_only=True)."),
        click.option("--no-pretrained", is_flag=True, help="Random init: no download, no weights file."),
        click.option("--model-arg", multiple=True, metavar="KEY=VALUE",
                     help="Passed to timm.create_model, e.g. --model-arg img_size=112. Repeatable."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@cli.command()
@conversion_options(required=True)
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Output folder.  [default: ./<model>-idle]")
@click.option("--force", is_flag=True,
              help="Replace the model files of an existing model folder (its other files stay).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def convert(model_name, keep, schedule, plan_text, weights, no_pretrained, model_arg, output, force, as_json):
    """Convert a ViT to dynamic token idling and save it (model.safetensors + vitidle.json).

    --model also takes a transformers model: hf:ORG/NAME (the hub, or its local cache offline) or
    hf:./FOLDER (a save_pretrained folder); --model-arg then only sets attn_implementation.
    """
    import copy
    from pathlib import Path

    import vitidle
    from vitidle import hf, zoo
    from vitidle.evaluate import evaluate
    from vitidle.engine import IdlePlan
    from vitidle.engine.discover import input_size
    from vitidle.flops import count_macs
    from vitidle.io import check_destination
    from vitidle.models import create, resolve_name

    if hf.is_hf_name(model_name):  # hf:org/name or hf:./folder: a transformers model (vitidle/hf.py)
        name, create = model_name, hf.create
        default = Path(model_name[len(hf.PREFIX):].rstrip("/")).name or "hf-model"
    else:
        name = default = resolve_name(model_name)
    folder = Path(output or f"{default}-idle")
    check_destination(folder, force)  # before the work, not after it
    kwargs = _parse_model_args(model_arg)
    model = create(name, pretrained=not no_pretrained, weights=weights, **kwargs).eval()
    size = input_size(model)
    dense_macs = count_macs(model)
    sample = None if no_pretrained or weights else zoo.eval_sample(name)  # a shipped model, its data at hand
    dense = copy.deepcopy(model) if sample is not None else None
    vitidle.convert(model, keep, schedule=schedule, plan=plan_text, model_kwargs=kwargs)
    idle_macs = count_macs(model)
    vitidle.save(model, folder, force=force)
    top1 = {k: evaluate(m, sample, batch_size=250)["top1"] for k, m in (("dense", dense), ("idle", model))} \
        if sample is not None else None

    config = model.vitidle_config
    num_patches = config["layout"]["num_tokens"] - config["layout"]["num_prefix"]
    summary = {
        "model": name,
        "weights": str(weights) if weights else ("random init" if no_pretrained else "pretrained"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": list(size),
        "gmacs_dense": round(dense_macs / 1e9, 3),
        "gmacs_idle": round(idle_macs / 1e9, 3),
        "plan": config["plan"],
        "output": str(folder),
        **({"top1": top1, "top1_images": f"the first {sample.val_limit} {sample.dataset} test images"} if top1 else {}),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    rows = [
        ("model", f"{name} ({summary['weights']})"),
        ("parameters", f"{summary['parameters'] / 1e6:.2f} M"),
        ("input", "x".join(map(str, size))),
        ("GMACs dense", f"{dense_macs / 1e9:.3g}"),
        ("GMACs idle", f"{idle_macs / 1e9:.3g} ({100 * (1 - idle_macs / dense_macs):.0f}% fewer)"),
        ("plan", IdlePlan(tuple(config["plan"]["keep"])).describe(num_patches)),
        *([("top-1", f"dense {top1['dense']:.2f}%, idle {top1['idle']:.2f}% without finetuning "
                     f"({summary['top1_images']}; vitidle finetune recovers it: docs/results.md)")] if top1 else []),
        ("output", f"{folder}/"),
    ]
    _print_table(rows)


def _model_folder(model: str | None):
    """MODEL as given, else the model folder in the current directory (see `vitidle.io.find_model`)."""
    from pathlib import Path

    from vitidle.io import find_model

    if model is not None:
        return Path(model)
    folder, choices = find_model(".")
    if choices > 1:
        click.echo(f"vitidle: using {folder}/, the newest of {choices} model folders here (pass MODEL to choose)",
                   err=True)
    return folder


def _options_given(names: tuple[str, ...]) -> list[str]:
    """The options among `names` that the user passed on the command line (not left at their default)."""
    ctx = click.get_current_context()
    return [p.opts[0] for p in ctx.command.params
            if p.name in names and ctx.get_parameter_source(p.name) is not click.core.ParameterSource.DEFAULT]


def _check_model_source(model: str | None, model_name: str | None) -> None:
    """A model folder or --model NAME, not both; conversion options only with --model."""
    given = _options_given(CONVERSION_PARAMS)
    if model_name and model:
        raise click.UsageError("pass either MODEL or --model, not both")
    if given and not model_name:
        raise click.UsageError(f"{', '.join(given)} only apply with --model (a model folder keeps its own plan and "
                               "weights)")


def _convert_on_the_fly(model_name, keep, schedule, plan_text, weights, no_pretrained, model_arg, keep_dense=True):
    """(dense or None, converted, source) for --model NAME (timm, or hf:ORG/NAME / hf:./FOLDER as in 'convert')."""
    import copy

    import vitidle
    from vitidle import hf
    from vitidle.models import create

    kwargs = _parse_model_args(model_arg)
    dense = (hf.create if hf.is_hf_name(model_name) else create)(
        model_name, pretrained=not no_pretrained, weights=weights, **kwargs).eval()
    idle = vitidle.convert(copy.deepcopy(dense) if keep_dense else dense, keep, schedule=schedule, plan=plan_text,
                           model_kwargs=kwargs)
    return (dense if keep_dense else None), idle, f"{idle.vitidle_config['base_model']} (converted on the fly)"


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in rows) + 2
    for key, value in rows:
        click.echo(f"{key:<{width}}{value}")


MODEL_LOOKUP = """MODEL is a model folder (model.safetensors + vitidle.json). Without it, the current
directory is used if it is a model folder, else the newest model folder inside it (by the time its
vitidle.json was written): in a folder where you ran 'vitidle convert --model deit_small', that is
./deit_small_patch16_224-idle/, or a later step's output such as a finetuned copy."""


@cli.command(epilog=MODEL_LOOKUP)
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--onnx", "to_onnx", is_flag=True, help="Export to ONNX (the only format for now; required).")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="ONNX file to write.  [default: MODEL/model.onnx, MODEL/dense.onnx with --dense]")
@click.option("--dense", is_flag=True, help="Export the dense base model with the same weights (the baseline).")
@click.option("--legacy", is_flag=True, help="Use torch's TorchScript exporter instead of the dynamo exporter.")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True, help="ONNX opset.")
@click.option("--int8", is_flag=True,
              help="int8 weights: onnxruntime's dynamic quantization of the checked float32 export, gated by "
                   "--max-rel-diff and --min-top1.  [default file: MODEL/model.int8.onnx]")
@click.option("--fp16", is_flag=True,
              help="float16 weights and arithmetic (inputs and outputs stay float32), gated like --int8.  "
                   "[default file: MODEL/model.fp16.onnx]")
@click.option("--atol", type=click.FloatRange(min=0.0),
              help="Largest |onnxruntime - PyTorch| output difference the parity gate accepts.  "
                   "[default: 1e-4; none with --int8 or --fp16]")
@click.option("--max-rel-diff", type=click.FloatRange(min=0.0),
              help="Largest median, over the images, of max |onnxruntime - PyTorch| / the range of the image's "
                   "PyTorch outputs.  [default: 0.1 with --int8, 0.01 with --fp16, none otherwise]")
@click.option("--min-top1", type=click.FloatRange(0.0, 1.0),
              help="Least share of the photos with PyTorch's top-1 class.  [default: 0.85 with --int8 or --fp16, "
                   "else 1]")
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="Folder of photos for the top-1 check.  [default: scikit-image's sample photos]")
@click.option("--check-only", is_flag=True, help="Run the parity gate on an existing ONNX file; export nothing.")
@click.option("--force", is_flag=True, help="Replace an existing ONNX file.")
@click.option("--json", "as_json", is_flag=True, help="Print the parity report as JSON.")
def export(model, to_onnx, output, dense, legacy, opset, int8, fp16, atol, max_rel_diff, min_top1, images, check_only,
           force, as_json):
    """Export a converted model to ONNX and prove onnxruntime matches PyTorch.

    The file is exported to a temporary folder, checked with onnx.checker (full check), then run by
    onnxruntime on CPU: output names, shapes and values must match PyTorch within --atol at batch 1
    and 4 and on photos, with the same top-1 class. Only then is it moved into place; on a mismatch
    the command exits 1 with the largest difference and writes nothing. Dynamic batch axis;
    weights go to FILE.data when they pass protobuf's 2 GiB.

    With --int8 or --fp16 the float32 export passes that gate first, is then converted, and the
    converted file must keep the typical image's outputs within --max-rel-diff of its logit range and
    the top-1 class of at least --min-top1 of the photos.
    """
    from pathlib import Path

    import vitidle
    from vitidle.export import check_onnx, data_path, export_onnx

    if not to_onnx:
        raise click.UsageError("choose the format: --onnx")
    given = _options_given(("legacy", "opset", "force"))
    if check_only and given:
        raise click.UsageError(f"{', '.join(given)} only apply to an export, not to --check-only")
    if int8 and fp16:
        raise click.UsageError("choose one of --int8 and --fp16")
    precision, suffix = ("int8", ".int8") if int8 else ("float16", ".fp16") if fp16 else ("float32", "")
    folder = _model_folder(model)
    target = Path(output) if output else folder / f"{'dense' if dense else 'model'}{suffix}.onnx"
    net = vitidle.load(folder, dense=dense)
    gate = dict(precision=precision, atol=atol, max_rel_diff=max_rel_diff, min_top1=min_top1, images=images)
    if check_only:
        report = check_onnx(net, target, **gate)
    else:
        report = export_onnx(net, target, opset=opset, legacy=legacy, force=force, **gate)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    agree = "n/a (no class logits)" if report.top1_agreement is None else f"{100 * report.top1_agreement:.0f}%" + \
        (f" (at least {100 * report.min_top1:.0f}%)" if report.min_top1 < 1 else "")
    size = sum(p.stat().st_size for p in (target, data_path(target)) if p.exists())
    bounds = [f"atol {report.atol:g}"] if report.atol is not None else []
    _print_table([
        ("model", f"{folder}/" + (" (dense)" if dense else "")),
        ("onnx", f"{target} ({size / 2**20:.1f} MiB, {precision}, opset {report.opset}"
                 + (f", {report.exporter} exporter)" if report.exporter else ")")),
        ("max diff", f"{report.max_diff:.2e} ({'; '.join(bounds + [''])}batch "
                     f"{', '.join(map(str, report.batch_sizes))} and {report.images} photos)"),
        *([("rel diff", f"{100 * report.rel_diff_median:.3g}% of an image's output range at the median (at most "
                        f"{100 * report.max_rel_diff:g}%), {100 * report.rel_diff_max:.3g}% at the largest")]
          if report.max_rel_diff is not None else []),
        ("top-1 agree", agree),
        ("parity", "passed" + ("" if check_only else ": written")),
    ])


@cli.command(epilog=MODEL_LOOKUP)
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False))
@conversion_options(required=False)
@click.option("--batch-size", "-b", "batch_sizes", type=click.IntRange(min=1), multiple=True,
              help="Batch size to time; repeatable.  [default: 1 and 16]")
@click.option("--repeats", type=click.IntRange(min=1), default=15, show_default=True,
              help="Timed rounds (dense, idle, limit in turn): median ms, and median ratios within a round.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed calls per model first.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch and onnxruntime.  [default: torch's]")
@click.option("--no-onnx", is_flag=True, help="Time PyTorch only.")
@click.option("--legacy", is_flag=True, help="Export for onnxruntime with the TorchScript exporter.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] for PyTorch.")
@click.option("--cuda-graphs", is_flag=True, help="With --device cuda: replay a captured CUDA graph per batch size.")
@click.option("--compile", "use_compile", is_flag=True,
              help="torch.compile dense, idle and the limit alike (CPU or CUDA), each compiled by an untimed first "
                   "call per batch size; the compile seconds are reported.")
@click.option("--no-freeze", is_flag=True,
              help="Time the idle model as trained, not frozen for inference (vitidle.freeze: it reuses a product of "
                   "the weights).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(model, model_name, keep, schedule, plan_text, weights, no_pretrained, model_arg, batch_sizes, repeats, warmup,
          threads, no_onnx, legacy, device, cuda_graphs, use_compile, no_freeze, as_json):
    """Time a converted model against its dense model and the limit of idling.

    Dense, idle and the limit (each block run on its kept token count with no selection cost) are
    timed in one process, in turns, in PyTorch eager and in onnxruntime (CPU, exported the same
    way). Reports ms per batch, images/s, the idle and limit speedups over dense, and the % of the
    limit's speedup reached, with parameters and GMACs. With --model, the model is created and
    converted on the fly (the conversion options as in 'vitidle convert') instead of loading MODEL.
    """
    import torch

    import vitidle
    from vitidle.bench import bench as run_bench
    from vitidle.bench import markdown_table

    _check_model_source(model, model_name)
    if threads:
        torch.set_num_threads(threads)
    if model_name:
        dense, idle, source = _convert_on_the_fly(model_name, keep, schedule, plan_text, weights, no_pretrained,
                                                  model_arg)
    else:
        folder = _model_folder(model)
        dense, idle = vitidle.load(folder, dense=True), vitidle.load(folder)
        source = f"{folder}/"
    vitidle.freeze(idle, not no_freeze)
    report = run_bench(dense, idle, batch_sizes=batch_sizes or (1, 16), repeats=repeats, warmup=warmup,
                       onnx=not no_onnx, legacy=legacy, device=device, cuda_graphs=cuda_graphs,
                       compile=use_compile, progress=not as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from vitidle.engine import IdlePlan

    g = report["gmacs"]
    num_patches = idle.vitidle_config["layout"]["num_tokens"] - idle.vitidle_config["layout"]["num_prefix"]
    _print_table([
        ("model", source),
        ("plan", IdlePlan(tuple(report["plan"]["keep"])).describe(num_patches, report["plan"]["num_keep"])),
        ("parameters", f"{report['parameters'] / 1e6:.2f} M"),
        ("idle", "frozen for inference (vitidle.freeze)" if report["frozen"] else "not frozen (--no-freeze)"),
        ("GMACs", f"dense {g['dense']:.2f}, idle {g['idle']:.2f}, limit {g['limit']:.2f}"),
        ("device", f"{report['device']} ({report['device_name']}), {report['threads']} threads, "
                   + ", ".join(f"{k} {v}" for k, v in report["versions"].items())),
        *([("compile", "dense, idle and limit under torch.compile (static shapes), each compiled by an untimed first "
                       "call per batch size (its seconds: the table's last column)")] if use_compile else []),
        ("timing", f"median of {report['repeats']} interleaved rounds after {report['warmup']} warm-up calls; "
                   "speedups and % of limit from ratios within each round"),
    ] + ([("onnxruntime", f"skipped: {report['onnxruntime_skipped']}")] if "onnxruntime_skipped" in report else []))
    click.echo("")
    click.echo(markdown_table(report["results"]))


@cli.command(epilog=MODEL_LOOKUP)
@click.argument("paths", nargs=-1, metavar="[MODEL] IMAGE...")
@conversion_options(required=False)
@click.option("--layers", metavar="BLOCKS", help="Idle blocks to draw, e.g. 3,6,9-11.  [default: every idle block]")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="visualize.png", show_default=True,
              help="PNG file to write (replaced if it exists).")
def visualize(paths, model_name, keep, schedule, plan_text, weights, no_pretrained, model_arg, layers, output):
    """Draw which image patches each idle layer keeps: one panel per idle block over each image.

    Each IMAGE goes through the model's own preprocessing (timm's eval transform for its input
    config); idle patches are tinted, kept patches clear, and each panel's title gives the kept count.
    One row per image. MODEL is a model folder; with --model, the model is created and converted on
    the fly (the conversion options as in 'vitidle convert') instead.
    """
    from pathlib import Path

    import vitidle
    from vitidle.visualize import check_output, parse_layers

    paths = list(paths)
    model = paths.pop(0) if paths and Path(paths[0]).is_dir() else None
    _check_model_source(model, model_name)
    if not paths:
        raise click.UsageError("give at least one IMAGE file")
    blocks = parse_layers(layers) if layers is not None else None
    check_output(output)  # before the model is made
    if model_name:
        _, net, source = _convert_on_the_fly(model_name, keep, schedule, plan_text, weights, no_pretrained, model_arg,
                                             keep_dense=False)
    else:
        folder = _model_folder(model)
        net, source = vitidle.load(folder), f"{folder}/"
    masks = vitidle.visualize(net, paths, output, layers=blocks)
    num_patches = next(iter(masks.values())).shape[1:].numel()
    _print_table([
        ("model", source),
        ("images", f"{len(paths)} ({', '.join(Path(p).name for p in paths)})"),
        ("kept", ", ".join(f"block {b}: {int(m[0].sum())}/{num_patches}" for b, m in masks.items())),
        ("output", str(output)),
    ])


TIMM_DATASET_PREFIXES = ("torch", "hfds", "hfids", "tfds", "wds")  # timm.data.create_dataset's readers


@cli.command("eval", epilog=MODEL_LOOKUP)
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_name", required=True, metavar="FOLDER|fashion_mnist|NAME",
              help="An image folder (FOLDER/validation, FOLDER/val or FOLDER itself), fashion_mnist (Debian's "
                   "dataset-fashion-mnist files), or a timm.data name such as torch/cifar10 (with --root).")
@click.option("--root", help="Dataset folder for fashion_mnist or a timm.data name.")
@click.option("--split", default="validation", show_default=True, help="Split to evaluate.")
@click.option("--dense", is_flag=True, help="Evaluate the same weights without idling: the training-free drop.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Data loader processes.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_command(model, data_name, root, split, dense, limit, batch_size, workers, device, as_json):
    """Top-1 / top-5 accuracy (micro average), images/s and GMACs of a model folder on labelled images."""
    from pathlib import Path

    import vitidle
    from vitidle.bench import check_device
    from vitidle.evaluate import evaluate
    from vitidle.io import read_config
    from vitidle.train.recipe import DataSection

    folder = _model_folder(model)
    if data_name == "fashion_mnist" or data_name.partition("/")[0] in TIMM_DATASET_PREFIXES:
        kind = data_name
    elif Path(data_name).is_dir():
        kind, root = "folder", data_name
    else:
        raise click.BadParameter(f"{data_name}: the image folder does not exist (or name fashion_mnist, or a timm "
                                 "dataset such as torch/cifar10)", param_hint="--data")
    data = DataSection(dataset=kind, root=root, val_split=split, val_limit=limit)
    net = vitidle.load(folder, dense=dense)
    result = evaluate(net, data, batch_size=batch_size, num_workers=workers, device=str(check_device(device)),
                      progress=not as_json, input_config=read_config(folder)["input"])  # dense too: the same input
    result = {"model": str(folder), "weights": "dense" if dense else "idle", "data": f"{kind} {root or ''}".strip(),
              "split": split, **result}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_table([
        ("model", f"{folder}/ ({'dense: same weights, no idling' if dense else 'idle'})"),
        ("data", f"{result['data']} ({split}, {result['images']} images)"),
        ("top-1", f"{result['top1']:.2f}%"),
        ("top-5", f"{result['top5']:.2f}%"),
        ("images/s", f"{result['images_per_s']:.1f} (batch {batch_size}, data loading included)"),
        ("GMACs", f"{result['gmacs']:.4g} per image"),
    ])


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; errors print one line on stderr (exit 2 for usage, 1 at run time) unless --debug."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="vitidle", standalone_mode=False)
    except click.UsageError as e:
        if debug:
            raise
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"vitidle: error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"vitidle: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("vitidle: aborted", err=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        from vitidle.errors import VitidleError

        if isinstance(e, VitidleError):
            click.echo(f"vitidle: error: {e}", err=True)
            sys.exit(e.exit_code)
        click.echo(f"vitidle: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(1)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
