"""The finetune loss: token cut loss against hand-computed values, distillation, the total."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitidle.train.losses import FEATURE_WEIGHT, classification_loss, finetune_loss, token_cut_loss

# 4 tokens (class + 3 image tokens); tokens 0 and 1 kept, 2 and 3 idle
LOGITS = [[0.0, 1.0, 2.0, 0.5],
          [1.0, 0.0, -1.0, 2.0],
          [0.5, 0.5, 0.0, 1.0],
          [2.0, -2.0, 1.0, 0.0]]
MASK = [1.0, 1.0, 0.0, 0.0]


def by_hand(logits, mask):
    """inter and intra of the issue, with plain Python loops."""
    n = len(mask)
    inter, intra = [], []
    for i in range(n):
        exps = [math.exp(v) for v in logits[i]]
        w = [e / sum(exps) for e in exps]
        inter.append(sum(abs(mask[i] - mask[j]) * w[j] for j in range(1, n)))  # class column (j = 0) zeroed
        intra.append(sum(mask[i] * mask[j] * w[j] for j in range(n)))
    mse_inter = sum(v * v for v in inter) / n
    mse_intra = sum((v - m) ** 2 for v, m in zip(intra, mask)) / n
    return mse_inter, mse_intra


def test_cut_loss_equals_hand_computed_value():
    logits, mask = torch.tensor([LOGITS]), torch.tensor([MASK])
    inter, intra = by_hand(LOGITS, MASK)
    assert token_cut_loss(logits, mask, "inter").item() == pytest.approx(inter, rel=1e-6)
    assert token_cut_loss(logits, mask, "intra").item() == pytest.approx(intra, rel=1e-6)
    assert token_cut_loss(logits, mask, "both").item() == pytest.approx(inter + intra, rel=1e-6)
    assert token_cut_loss(logits, mask, "none").item() == 0.0


def test_cut_loss_is_zero_for_a_perfect_cut():
    big = -1e4  # kept tokens attend only to kept ones, idle only to idle ones
    logits = torch.tensor([[[0.3, 1.0, big, big], [2.0, 0.1, big, big], [big, big, 0.0, 1.5], [big, big, -1.0, 0.2]]])
    assert token_cut_loss(logits, torch.tensor([MASK]), "both").item() == pytest.approx(0.0, abs=1e-12)
    # the same attention with the mask flipped between the two image tokens is far from a cut
    assert token_cut_loss(logits, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), "both").item() > 0.1


def test_attention_to_the_class_token_is_never_a_cut():
    big = -1e4  # idle tokens attend only to the class token: the class column is zeroed in inter
    logits = torch.tensor([[[0.0, 0.0, big, big], [0.0, 0.0, big, big], [0.0, big, big, big], [0.0, big, big, big]]])
    assert token_cut_loss(logits, torch.tensor([MASK]), "inter").item() == pytest.approx(0.0, abs=1e-12)


def test_cut_loss_batches_and_has_gradients():
    logits = torch.randn(3, 6, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    loss = token_cut_loss(logits, mask)
    singles = [token_cut_loss(logits[i:i + 1], mask[i:i + 1]) for i in range(3)]
    assert loss.item() == pytest.approx(sum(s.item() for s in singles) / 3, rel=1e-5)  # mean over B and N
    loss.backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="both, intra, inter, none"):
        token_cut_loss(logits, mask, "cross")


def test_finetune_loss_weights_each_term_as_the_paper():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    fs, ft = torch.randn(4, 8), torch.randn(4, 8)
    y = torch.tensor([0, 1, 2, 3])
    cuts = [torch.tensor(0.5), torch.tensor(0.25)]
    terms = finetune_loss(s, y, cut_losses=cuts, num_idle=2, features=fs, teacher_logits=t, teacher_features=ft,
                          lambda_cut=20, lambda_kd=10)
    # KL(teacher ‖ student), summed over classes, mean over the batch
    p_t = t.softmax(-1)
    kl = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()
    feat = ((F.normalize(fs, dim=-1) - F.normalize(ft, dim=-1)) ** 2).mean()
    ce = F.cross_entropy(s, y)
    assert terms["kd"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert terms["feature"].item() == pytest.approx(feat.item(), rel=1e-5)
    assert terms["cut"].item() == pytest.approx(0.75)
    expected = ce + 20 * 0.75 / 2 + 10 * kl + FEATURE_WEIGHT * 10 * feat
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    # no teacher: CE (+ cut) only
    plain = finetune_loss(s, y, cut_losses=cuts, num_idle=2, lambda_cut=20)
    assert plain["total"].item() == pytest.approx(ce.item() + 7.5, rel=1e-5)


def test_soft_targets_and_label_smoothing():
    logits, y = torch.randn(3, 4), torch.tensor([0, 2, 3])
    soft = F.one_hot(y, 4).float() * 0.9 + 0.1 / 4
    assert classification_loss(logits, soft).item() == pytest.approx(
        F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-5)
    assert classification_loss(logits, y, 0.1).item() == pytest.approx(
        F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-5)
