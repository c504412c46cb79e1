"""`vitidle.visualize` and `vitidle visualize`: the drawn masks are the selectors' kept tokens; bad input is one line."""

import numpy as np
import pytest
import timm
import torch
import transformers as T
from conftest import tiny
from PIL import Image
from test_cli import TINY_ARGS, assert_one_error_line, run

import vitidle
from vitidle.errors import UsageError
from vitidle.visualize import FADE, TINT, overlay, parse_layers


def pictures(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def expected_masks(model, num_prefix: int, grid: int) -> dict[int, torch.Tensor]:
    """Block index -> (B, grid, grid) masks built from each selector's kept_index, written out by hand."""
    out = {}
    for i, name in enumerate(model.vitidle_config["layout"]["blocks"]):
        selector = getattr(model.get_submodule(name), "selector", None)
        if selector is None:
            continue
        index = selector.kept_index
        masks = torch.zeros(index.shape[0], grid * grid, dtype=torch.bool)
        for b in range(index.shape[0]):
            for position in index[b].tolist():
                if position >= num_prefix:  # prefix tokens (class, distillation, registers) are no patches
                    masks[b, position - num_prefix] = True
        out[i] = masks.view(-1, grid, grid)
    return out


def test_drawn_masks_are_the_kept_tokens_of_each_idle_layer(tmp_path):
    # class + distillation token: image token j sits at position 2 + j
    dense = tiny("deit_small_distilled_patch16_224")
    model = vitidle.convert(dense, 0.5)  # blocks 1, 2, 3 keep 8, 4, 2 of 16
    images = pictures(3, 80)
    masks = vitidle.visualize(model, images, tmp_path / "out.png")
    assert list(masks) == [1, 2, 3]
    want = expected_masks(model, num_prefix=2, grid=4)
    for block, mask in masks.items():
        assert torch.equal(mask, want[block])
        assert mask.sum((1, 2)).tolist() == [[8, 4, 2][block - 1]] * 3
    assert not torch.equal(masks[1][0], masks[1][1])  # each image has its own tokens
    # the model saw its own preprocessing: timm's eval transform for its data config
    cfg = timm.data.resolve_data_config(model=dense)
    cfg["input_size"] = (3, 64, 64)
    x = torch.stack([timm.data.create_transform(**cfg)(image) for image in images])
    with torch.no_grad():
        model(x)
    assert all(torch.equal(masks[b], m) for b, m in expected_masks(model, 2, 4).items())
    with Image.open(tmp_path / "out.png") as png:
        assert png.format == "PNG" and png.width > png.height  # three rows of four panels
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # written through a temporary file, renamed


def test_a_hugging_face_model_with_registers(tmp_path):
    config = T.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=64, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = vitidle.convert(T.Dinov2WithRegistersModel(config).eval(), keep=0.5)
    images = pictures(2, 32)
    masks = vitidle.visualize(model, images, tmp_path / "hf.png", layers=[2, 3])
    assert list(masks) == [2, 3]
    want = expected_masks(model, num_prefix=5, grid=4)  # class + 4 registers before the patches
    assert all(torch.equal(masks[b], want[b]) for b in (2, 3))
    # preprocessing: the saved input config (32 px, mean and std 0.5), which leaves a 32 px image uncropped
    x = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) / 255 for i in images])
    with torch.no_grad():
        model(pixel_values=(x - 0.5) / 0.5)
    assert all(torch.equal(masks[b], m) for b, m in expected_masks(model, 5, 4).items() if b in (2, 3))


def test_overlay_tints_exactly_the_idle_patches():
    rng = np.random.default_rng(0)
    image = rng.random((12, 8, 3))
    mask = torch.tensor([[True, False], [False, True], [True, True]])  # 3 x 2 patches of 4 x 4 pixels
    out = overlay(image, mask)
    for r in range(3):
        for c in range(2):
            patch, drawn = image[4 * r:4 * r + 4, 4 * c:4 * c + 4], out[4 * r:4 * r + 4, 4 * c:4 * c + 4]
            want = patch if mask[r, c] else (1 - FADE) * patch + FADE * TINT
            np.testing.assert_array_equal(drawn, want)


def test_layers_pick_blocks_and_bad_ones_are_refused(tmp_path):
    model = vitidle.convert(tiny("deit_tiny_patch16_224"), 0.5)
    assert list(vitidle.visualize(model, pictures(1, 64), tmp_path / "a.png", layers=[3, 1])) == [1, 3]
    with pytest.raises(UsageError, match="block 0 is not an idle block; the idle blocks are 1-3"):
        vitidle.visualize(model, pictures(1, 64), tmp_path / "b.png", layers=[0])
    with pytest.raises(UsageError, match="no idle layers"):
        vitidle.visualize(tiny("deit_tiny_patch16_224"), pictures(1, 64), tmp_path / "c.png")
    with pytest.raises(UsageError, match="image not found"):
        vitidle.visualize(model, tmp_path / "missing.png", tmp_path / "d.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # nothing written on an error
    assert parse_layers("3,6, 9-11") == [3, 6, 9, 10, 11]
    with pytest.raises(UsageError, match="not a block index"):
        parse_layers("3-")


# --- the command ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    pictures(1, 70)[0].save(path)
    return path


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A converted tiny DeiT: blocks 1, 2, 3 keep 8, 4, 2 of 16 image tokens."""
    folder = tmp_path_factory.mktemp("models") / "m"
    vitidle.save(vitidle.convert(tiny("deit_tiny_patch16_224"), 0.5), folder)
    return folder


def test_cli_draws_a_model_folder_and_converts_on_the_fly(capsys, tmp_path, monkeypatch, image_file, model_folder):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "visualize", model_folder, image_file, image_file, "--layers", "2-3", "-o", "fig.png")
    assert code == 0, err
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert rows["kept"] == "block 2: 4/16, block 3: 2/16"
    assert rows["images"].startswith("2 (photo.png")
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.chdir(model_folder)
    code, out, err = run(capsys, "visualize", image_file, "--layers", "1")  # the model folder here, default -o
    assert code == 0, err
    assert "block 1: 8/16" in out and (model_folder / "visualize.png").is_file()
    (model_folder / "visualize.png").unlink()
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "visualize", *TINY_ARGS, "--keep", "0.25", image_file, "-o", "fly.png")
    assert code == 0, err
    assert "converted on the fly" in out and "block 1: 4/16" in out and (tmp_path / "fly.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["M", "IMG", "--layers", "0"], "block 0 is not an idle block"),
    (["M", "IMG", "--layers", "one"], "not a block index"),
    (["M", "MISSING"], "image not found"),
    (["M", "CORRUPT"], "cannot read image"),
    (["M", "IMG", "-o", "out.jpg"], "PNG"),
    (["M", "IMG", "-o", "nofolder/out.png"], "does not exist"),
    (["M", "IMG", "--keep", "0.5"], "only apply with --model"),
    (["M", "IMG", *TINY_ARGS], "either MODEL or --model"),
    (["M"], "IMAGE"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path, monkeypatch, image_file, model_folder, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    names = {"IMG": image_file, "MISSING": tmp_path / "missing.png", "CORRUPT": tmp_path / "corrupt.png",
             "M": model_folder}
    code, _, err = run(capsys, "visualize", *(names.get(a, a) for a in args))
    assert code == 2, err
    assert_one_error_line(err)
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.png"]  # no figure written
