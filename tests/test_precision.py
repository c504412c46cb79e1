"""A converted model in half precision and in int8 in PyTorch: it runs, and keeps what its own arithmetic ranks top."""

import copy

import pytest
import timm
import torch
from torch import nn

import vitidle
from vitidle.idle import TokenSelector, _is_plain_linear, idle_selectors

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch.ao's own deprecation

KWARGS = {"depth": 4, "img_size": 64}  # 16 image tokens; blocks 1-3 idle at 11, 7, 5 tokens (keep 0.7)


def converted(keep):
    torch.manual_seed(0)
    return vitidle.convert("deit_tiny", keep=keep, pretrained=False, model_kwargs=dict(KWARGS)).eval()


@pytest.fixture(scope="module")
def idle():
    """A converted model (keep 0.7); tests change copies of it."""
    return converted(0.7)


@pytest.fixture(scope="module")
def full():
    """A converted model at keep 1.0, which must compute the dense model."""
    return converted(1.0)


def dense_twin(model):
    dense = timm.create_model("deit_tiny_patch16_224", pretrained=False, **KWARGS).eval()
    dense.load_state_dict(model.state_dict())
    return dense


def images(n, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_half_precision_model_runs_on_cpu_and_keep_one_is_the_dense_model(idle, full, dtype):
    for frozen in (False, True):
        model = vitidle.freeze(copy.deepcopy(idle).to(dtype), frozen)
        for n in (1, 3):  # the batch-1 path and the general one
            with torch.no_grad():
                out = model(images(n).to(dtype))
            assert out.dtype == dtype and out.shape == (n, 1000) and out.isfinite().all()
            for selector in idle_selectors(model):
                assert selector.kept_index.shape == (n, 1 + selector.num_keep)
                assert (selector.kept_index == 0).any(1).all()  # the class token is always kept
    # at keep 1.0 every token is kept: the converted model computes the dense one, in the same precision
    float32 = dense_twin(full)
    half, dense = copy.deepcopy(full).to(dtype), copy.deepcopy(float32).to(dtype)
    x = images(3).to(dtype)
    with torch.no_grad():
        got, want, reference = half(x).float(), dense(x).float(), float32(x.float())
    error = (want - reference).abs().max()  # the precision's own error against float32
    assert 0 < error < 0.1
    torch.testing.assert_close(got, want, atol=float(error), rtol=0)


def separated_tokens(B, N, C, proj, gap):
    """Normed tokens whose class-query scores are 0, gap, 2 gap, ... in a random order: no two nearly tie.

    A token's score is x_j · u with u = W_kᵀ (W_q x_cls + b_q) (docs/method.md): the image tokens are
    random directions orthogonal to u plus a chosen multiple of u.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    W, b = proj.weight.double(), proj.bias.double()
    for i in range(B):
        u = W[C:2 * C].t() @ (W[:C] @ x[i, 0] + b[:C])
        rest = x[i, 1:] - torch.outer(x[i, 1:] @ u, u) / (u @ u)
        scores = gap * torch.randperm(N - 1, generator=g).double()
        x[i, 1:] = rest + torch.outer(scores, u) / (u @ u)
    return x.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_half_precision_keeps_the_float32_top_k_where_scores_are_apart(dtype, batch):
    N, C, keep = 33, 32, 12
    torch.manual_seed(0)
    proj = nn.Linear(C, 3 * C)  # a fused qkv projection
    selector = TokenSelector(num_keep=keep, num_prefix=1, num_patches=N - 1, num_heads=4, scale=(C // 4) ** -0.5,
                             q_rows=slice(0, C), k_rows=slice(C, 2 * C)).eval()
    x = separated_tokens(batch, N, C, proj, gap=2.0)
    with torch.no_grad():
        u = torch.stack([proj.weight[C:2 * C].t() @ proj(x[i, :1])[0, :C] for i in range(batch)])
        scores = torch.einsum("bnc,bc->bn", x[:, 1:], u)
    top = scores.topk(keep, dim=1).values
    assert (top[:, -1] - scores.topk(keep + 1, dim=1).values[:, -1]).min() > 1.0  # the construction holds
    with torch.no_grad():
        want = selector(x, proj, proj).view(batch, -1) % N  # rows of (B * N, C) -> positions
    want = want.sort(1).values
    assert (want[:, 0] == 0).all()
    half = copy.deepcopy(proj).to(dtype)
    for frozen in (False, True):
        selector.frozen = frozen
        for _ in range(2):  # frozen: the second call reads the cached product
            with torch.no_grad():
                got = selector(x.to(dtype), half, half).view(batch, -1) % N
            assert torch.equal(got.sort(1).values, want)


# int8: torchao's quantize_ and torch.ao's quantize_dynamic


def torchao_int8(model):
    quantization = pytest.importorskip("torchao.quantization")
    quantization.quantize_(model, quantization.Int8DynamicActivationInt8WeightConfig())
    return model


def torch_ao_int8(model):
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


QUANTIZERS = {"torchao": torchao_int8, "torch.ao": torch_ao_int8}


@pytest.mark.parametrize("quantize", QUANTIZERS)
def test_an_int8_model_selects_the_top_k_of_its_own_quantized_scores(idle, quantize):
    model = QUANTIZERS[quantize](copy.deepcopy(idle))
    idle = [b for b in model.blocks if hasattr(b, "selector")]
    assert idle and not any(_is_plain_linear(b.attn.qkv) for b in idle)  # the selector calls the quantized layer
    normed = {}
    for i, block in enumerate(idle):
        block.norm1.register_forward_hook(lambda m, a, y, i=i: normed.__setitem__(i, y))
    C = model.embed_dim
    for n in (1, 3):
        with torch.no_grad():
            out = model(images(n))
        assert out.shape == (n, 1000) and out.isfinite().all()
        for i, block in enumerate(idle):
            with torch.no_grad():  # brute force: the quantized layer's own q and k of every token
                qkv = block.attn.qkv(normed[i])
            scores = (qkv[:, :1, :C] @ qkv[:, :, C:2 * C].transpose(1, 2)).squeeze(1)[:, 1:]  # B, N - 1
            index = block.selector.kept_index
            kept = torch.zeros(n, scores.shape[1] + 1, dtype=torch.bool).scatter_(1, index, True)
            assert kept[:, 0].all() and (kept.sum(1) == 1 + block.selector.num_keep).all()
            kept = kept[:, 1:]
            lowest_kept = scores.masked_fill(~kept, float("inf")).min(1).values
            highest_idle = scores.masked_fill(kept, -float("inf")).max(1).values
            assert (lowest_kept >= highest_idle - 1e-4 * scores.abs().max()).all()
    frozen = vitidle.freeze(copy.deepcopy(model))  # frozen reuses a product of plain weights only: no change here
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("quantize", QUANTIZERS)
def test_an_int8_model_at_keep_one_is_the_dense_int8_model(full, quantize):
    float32 = dense_twin(full)
    dense = QUANTIZERS[quantize](copy.deepcopy(float32))
    model = QUANTIZERS[quantize](copy.deepcopy(full))
    x = images(3)
    with torch.no_grad():
        reference, want, got = float32(x), dense(x), model(x)
    error = (want - reference).abs().max()  # int8's own error against float32
    assert error > 1e-3
    # the blocks see the tokens in another order, so a value on a rounding edge may round the other way: within
    # int8's own error, where a wrong token in a wrong place would be off by the logits' whole scale
    assert (got - want).abs().max() < 2 * error
    tokens = torch.randn(3, 17, model.embed_dim, generator=torch.Generator().manual_seed(2))
    for converted_block, dense_block in zip(model.blocks, dense.blocks):
        with torch.no_grad():
            torch.testing.assert_close(converted_block(tokens.clone()), dense_block(tokens), atol=1e-2, rtol=0)
