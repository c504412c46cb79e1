"""IdleViT's finetune loss: CE + λ_cut · token cut loss / #idle layers + distillation from the dense teacher.

    total = CE + λ_cut · Σ_layers L_cut / #idle layers + λ_kd · KL(teacher ‖ student) + 100 · λ_kd · MSE(f̂_s, f̂_t)

with f̂ the L2-normalised class-token (pre-logit) features, as in the official losses.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CUT_VARIANTS = ("both", "intra", "inter", "none")
FEATURE_WEIGHT = 100.0  # the feature term's weight relative to λ_kd (official code: distill_weight * 100)


def token_cut_loss(logits: Tensor, mask: Tensor, variant: str = "both") -> Tensor:
    """The token cut loss of one idle layer: attention should stay within the kept and within the idle set.

    logits (B, N, N): head-mean pre-softmax attention logits over ALL tokens (`selector.attention_logits`);
    mask (B, N): 1 = kept (prefix tokens included), 0 = idle. With W = softmax over keys of the logits:
    inter_i = Σ_j |m_i − m_j| W_ij (class-token column zeroed) → MSE(inter, 0);
    intra_i = Σ_j m_i m_j W_ij → MSE(intra, m_i). `variant`: both, intra, inter or none.

    >>> logits = torch.tensor([[[0., 0., -1e9], [0., 0., -1e9], [-1e9, -1e9, 0.]]])  # 0-1 and 2 never meet
    >>> token_cut_loss(logits, torch.tensor([[1., 1., 0.]])).item()
    0.0
    """
    if variant not in CUT_VARIANTS:
        raise ValueError(f"cut variant must be one of {', '.join(CUT_VARIANTS)}, got {variant!r}")
    if variant == "none":
        return logits.new_zeros(())
    W = logits.float().softmax(dim=-1)  # B, N(query), N(key); in fp32 also under autocast
    m = mask.to(W)
    loss = W.new_zeros(())
    if variant in ("both", "inter"):
        cross = (m.unsqueeze(2) - m.unsqueeze(1)).abs()  # B, N, N: 1 where i and j are on different sides
        cross[:, :, 0] = 0.0  # every token may attend to the class token (the official code's choice)
        inter = (cross * W).sum(-1)  # B, N
        loss = loss + inter.pow(2).mean()  # MSE(inter, 0)
    if variant in ("both", "intra"):
        same = m.unsqueeze(2) * m.unsqueeze(1)  # B, N, N: 1 where both are kept
        intra = (same * W).sum(-1)  # B, N
        loss = loss + F.mse_loss(intra, m)
    return loss


def classification_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """CE against class indices (B,) with label smoothing, or against soft targets (B, classes) from mixup."""
    if target.dtype.is_floating_point:  # mixup / cutmix already smoothed them
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def distillation_losses(student_logits: Tensor, teacher_logits: Tensor, student_features: Tensor | None,
                        teacher_features: Tensor | None) -> tuple[Tensor, Tensor]:
    """(KL(teacher ‖ student) with batchmean, MSE of the L2-normalised features (B, C)); unweighted."""
    kl = F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                  reduction="batchmean", log_target=True)
    if student_features is None or teacher_features is None:
        return kl, kl.new_zeros(())
    mse = F.mse_loss(F.normalize(student_features.float(), dim=-1), F.normalize(teacher_features.float(), dim=-1))
    return kl, mse


def finetune_loss(
    logits: Tensor,
    target: Tensor,
    *,
    cut_losses: list[Tensor] = (),
    num_idle: int = 0,
    features: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_features: Tensor | None = None,
    lambda_cut: float = 20.0,
    lambda_kd: float = 10.0,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """The total loss and its terms (each unweighted, for logging): keys total, ce, cut, kd, feature.

    >>> t = finetune_loss(torch.zeros(2, 3), torch.tensor([0, 1]))
    >>> round(t["total"].item(), 4), t["cut"].item()
    (1.0986, 0.0)
    """
    ce = classification_loss(logits, target, label_smoothing)
    cut = torch.stack(list(cut_losses)).sum() if len(cut_losses) else ce.new_zeros(())
    total = ce + (lambda_cut * cut / num_idle if num_idle else 0.0)
    kd = feature = ce.new_zeros(())
    if teacher_logits is not None:
        kd, feature = distillation_losses(logits, teacher_logits, features, teacher_features)
        total = total + lambda_kd * kd + FEATURE_WEIGHT * lambda_kd * feature
    return {"total": total, "ce": ce, "cut": cut, "kd": kd, "feature": feature}
