"""The recipe: validation with one line per bad field, --set overrides, the schema, the CLI's errors."""

import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitidle.errors import UsageError
from vitidle.train.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict, schema_text

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name": "deit_tiny"}, "data": {"root": "imgs"}}
LINE = re.compile(r"^[A-Za-z_][\w.]*: \S")  # `path: why`


def errors(data, overrides=()):
    """The lines of the RecipeError a recipe raises (header removed)."""
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, list(overrides))
    text = str(info.value)
    body = text.split("\n")[1:] if "\n" in text else [text.split(": ", 1)[1]]
    assert all(LINE.match(line) for line in body), text
    return body


def with_(section, **fields):
    data = json.loads(json.dumps(MINIMAL))
    data.setdefault(section, {}).update(fields)
    return data


def test_defaults_follow_the_paper():
    r = recipe_from_dict(MINIMAL)
    assert isinstance(r, Recipe)
    assert (r.loss.lambda_cut, r.loss.lambda_kd, r.loss.cut) == (20.0, 10.0, "both")
    assert (r.optim.weight_decay, r.optim.lr, r.optim.min_lr, r.optim.frozen) == (0.05, 1e-5, 1e-6,
                                                                                 ["cls_token", "pos_embed"])
    assert r.teacher.enabled and r.run.epochs == 30
    assert issubclass(RecipeError, UsageError) and RecipeError.exit_code == 2


@pytest.mark.parametrize("section, fields, expected", [
    ("optim", {"lr": 0}, "optim.lr: must be > 0 (got 0)"),
    ("optim", {"lr": "fast"}, "optim.lr: must be a number (got 'fast')"),
    ("optim", {"weight_decay": -0.1}, "optim.weight_decay: must be >= 0"),
    ("optim", {"clip_grad": 0}, "optim.clip_grad: must be > 0"),
    ("optim", {"betas": [0.9, 1.0]}, "optim.betas: each must be in [0, 1)"),
    ("optim", {"betas": [0.9]}, "optim.betas: must be a list of 2 numbers"),
    ("optim", {"frozen": "cls_token"}, "optim.frozen: must be a list"),
    ("loss", {"cut": "cross"}, "loss.cut: must be one of both, intra, inter or none (got 'cross')"),
    ("loss", {"lambda_cut": -1}, "loss.lambda_cut: must be >= 0"),
    ("loss", {"lambda_kd": None}, "loss.lambda_kd: must be a number"),
    ("model", {"keep": 1.5}, "model.keep: must be <= 1"),
    ("model", {"keep": 0}, "model.keep: must be > 0"),
    ("model", {"schedule": "linear"}, "model.schedule: must be one of idlevit or constant"),
    ("model", {"drop_path": 1.0}, "model.drop_path: must be < 1"),
    ("model", {"model_kwargs": [1]}, "model.model_kwargs: must be a mapping"),
    ("model", {"folder": "m"}, "model: give exactly one of model.folder"),
    ("model", {"keep": 0.5, "plan": "3:0.5"}, "model: give model.keep or model.plan, not both"),
    ("model", {"model_kwargs": {"drop_path_rate": 0.1}}, "model: set drop path with model.drop_path"),
    ("data", {"root": None}, "data.root: an image folder dataset needs a root folder"),
    ("data", {"scale": [0.5, 0.2]}, "data.scale: must be [low, high]"),
    ("data", {"reprob": 2}, "data.reprob: must be <= 1"),
    ("data", {"train_limit": 0}, "data.train_limit: must be > 0"),
    ("data", {"std": [0.5, 0]}, "data.std: must be a non-empty list of numbers > 0"),
    ("teacher", {"enabled": "maybe"}, "teacher.enabled: must be true or false (got 'maybe')"),
    ("run", {"epochs": 2, "steps": 3}, "run: give exactly one of run.epochs and run.steps"),
    ("run", {"epochs": 1.5}, "run.epochs: must be a whole number"),
    ("run", {"epochs": 1, "batch_size": 0}, "run.batch_size: must be > 0"),
    ("run", {"epochs": 1, "batch_size": 3}, "run.batch_size: mixup / cutmix need an even batch size"),
    ("run", {"epochs": 1, "precision": "fp8"}, "run.precision: must be one of fp32, bf16 or fp16"),
    ("run", {"epochs": 1, "device": "tpu"}, "run.device: must be auto, cpu, cuda or cuda:N"),
    ("run", {"epochs": 1, "accumulation": -2}, "run.accumulation: must be > 0"),
    ("run", {"epochs": 1, "num_workers": -1}, "run.num_workers: must be >= 0"),
])
def test_each_bad_field_names_its_path_and_why(section, fields, expected):
    lines = errors(with_(section, **fields))
    assert any(line.startswith(expected) for line in lines), lines


def test_unknown_keys_suggest_the_nearest():
    lines = errors(with_("optim", lrr=1e-4) | {"rum": {}, "loss": {"lamda_cut": 1}})
    assert "optim.lrr: unknown key; did you mean optim.lr?" in lines
    assert "rum: unknown key; did you mean run?" in lines
    assert "loss.lamda_cut: unknown key; did you mean loss.lambda_cut?" in lines
    [line] = errors(with_("run", zzz=1, epochs=1))
    assert line.startswith("run.zzz: unknown key; valid keys: epochs, steps,")


def test_several_errors_one_line_each():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(with_("optim", lr=-1, weight_decay="x"), source="r.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid recipe r.yaml (2 errors):"
    assert lines[1:] == ["optim.lr: must be > 0 (got -1)", "optim.weight_decay: must be a number (got 'x')"]


def test_set_overrides_any_field():
    r = recipe_from_dict(MINIMAL, ["optim.lr=2e-5", "run.steps=10", "run.epochs=null", "model.model_kwargs.depth=4",
                                   "data.scale=[0.5, 1.0]", "teacher.enabled=off", "run.output=runs/x=y"])
    assert (r.optim.lr, r.run.steps, r.run.epochs) == (2e-5, 10, None)
    assert r.model.model_kwargs == {"depth": 4} and r.data.scale == (0.5, 1.0)
    assert r.teacher.enabled is False and r.run.output == "runs/x=y"
    assert errors(MINIMAL, ["optim.lr=0"]) == ["optim.lr: must be > 0 (got 0)"]
    assert errors(MINIMAL, ["optim.lrate=1"])[0].startswith("optim.lrate: unknown key; did you mean optim.lr")
    for bad in ("optim.lr", "=3", "optim..lr=3"):
        with pytest.raises(RecipeError, match="expected SECTION.KEY=VALUE"):
            recipe_from_dict(MINIMAL, [bad])
    with pytest.raises(RecipeError, match="optim.lr is not a section"):
        recipe_from_dict(MINIMAL, ["optim.lr=1", "optim.lr.x=2"])


def test_files_yaml_errors_and_non_mappings(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert load_recipe(path, ["optim.lr=3e-5"]).optim.lr == 3e-5
    cases = {
        "model: {name: [deit\n": r"r.yaml is not valid YAML at line \d+, column \d+: ",
        "- a\n- b\n": "a recipe is a mapping of sections .* got a list",
        "just text\n": "got a string",
        "!!python/object:os.system {}\n": "is not valid YAML",  # safe_load: never constructs objects
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(RecipeError, match=message) as info:
            load_recipe(path)
        assert "\n" not in str(info.value)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


# values of every kind a YAML file can hold, to put where they do not belong
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                      | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
FIELDS = [(section, name) for section, field in Recipe.model_fields.items()
          for name in field.annotation.model_fields]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS + [("model", "nope"), ("extra", "x")]), VALUES), min_size=1,
                max_size=4), st.booleans())
def test_generated_bad_recipes_give_one_line_per_field(changes, drop_data):
    data = json.loads(json.dumps(MINIMAL))
    for (section, name), value in changes:
        data.setdefault(section, {})
        if isinstance(data[section], dict):
            data[section][name] = value
    if drop_data:
        data.pop("data")
    try:
        recipe_from_dict(data)
    except RecipeError as e:
        text = str(e)
        lines = text.splitlines()
        body = lines[1:] if len(lines) > 1 else [text.split(": ", 1)[1]]
        assert all(LINE.match(line) for line in body), text
        assert "Traceback" not in text and "pydantic" not in text and "For further information" not in text


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    from cli.main import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(with_("optim", lr=-1)))
    for argv, expected in [
        (["finetune", str(path)], "optim.lr: must be > 0"),
        (["finetune", str(path), "--set", "optim.lr=1e-5", "--set", "run.precison=bf16"], "did you mean run.precision"),
        (["finetune", str(path), "--set", "optim"], "expected SECTION.KEY=VALUE"),
        (["finetune"], "missing RECIPE"),
        (["finetune", str(tmp_path / "none.yaml")], "cannot read recipe"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2, err
        assert err.startswith("vitidle: error: ") and expected in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # nothing written


def test_committed_schema_is_the_generated_one(capsys):
    from cli.main import main

    committed = (ROOT / "docs" / "recipe.schema.json").read_text()
    assert committed == schema_text(), "regenerate: vitidle finetune --schema > docs/recipe.schema.json"
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--schema"])
    assert info.value.code == 0 and capsys.readouterr().out == committed
    assert set(json.loads(committed)["properties"]) == {"model", "teacher", "data", "loss", "optim", "run"}
