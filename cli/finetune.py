"""`vitidle finetune RECIPE`: IdleViT's finetune from a recipe file (see docs/finetune.md)."""

from __future__ import annotations

import click


@click.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe field, e.g. --set optim.lr=2e-5 (VALUE read as YAML). Repeatable.")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and the plan; train nothing, write nothing.")
@click.option("--force", is_flag=True,
              help="Train into an existing run folder again (replaces its recipe.yaml, summary.csv and model files; "
                   "keeps other files). Never a folder that is not a run folder.")
@click.option("--resume", is_flag=True,
              help="Continue the run in run.output from its newest checkpoint (exactly: same weights as without a "
                   "stop, on CPU). The recipe must be the run's own (RECIPE may be OUT/recipe.yaml).")
@click.option("--schema", is_flag=True, help="Print the recipe's JSON schema (docs/recipe.schema.json) and exit.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or progress lines.")
def finetune(recipe, overrides, dry_run, force, resume, schema, quiet):
    """Finetune a converted ViT as IdleViT does: CE + token cut loss + distillation from the dense model.

    RECIPE is a YAML file (recipes/ has examples). The run folder (run.output) ends as a vitidle
    model folder with recipe.yaml, summary.csv and checkpoints/: `vitidle export --onnx OUT`,
    `vitidle bench OUT`. SIGTERM or Ctrl-C saves a checkpoint at the next step; --resume continues.
    """
    if schema:
        from vitidle.train.recipe import schema_text

        click.echo(schema_text(), nl=False)
        return
    if recipe is None:
        raise click.UsageError("missing RECIPE (a YAML file; see recipes/)")
    if force and resume:
        raise click.UsageError("--force starts the run again, --resume continues it: pass one")
    import yaml

    from vitidle.train.recipe import load_recipe

    resolved = load_recipe(recipe, list(overrides))
    if dry_run:
        from vitidle.train.loop import build_models, describe

        built = build_models(resolved, meta=True)
        click.echo(yaml.safe_dump(resolved.to_dict(), sort_keys=False), nl=False)
        click.echo("---")
        for key, value in describe(resolved, built):
            click.echo(f"{key:<12}{value}")
        click.echo("dry run: nothing trained, nothing written")
        return
    from vitidle.train.loop import finetune as run

    run(resolved, force=force, resume=resume, progress=not quiet, log=click.echo)
