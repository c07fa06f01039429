"""
Loss functions: pure functions of per-sequence (or per-token) tensors, each with its equation.
Every function returns the per-example loss; the caller chooses the aggregation (usually .mean()).
"""
import torch.nn.functional as F


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """Reward-model loss under the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022):

        P(chosen > rejected) = sigmoid(r_c - r_r)
        loss = -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2

    `margin` (a scalar or one per pair, Llama 2) demands a larger gap for pairs rated far apart.
    The centering term (Eisenstein et al. 2023) pins the free offset of the rewards near 0; averaged
    over the batch it is center_coef * mean((r_c + r_r)^2).
    Example: r_c = 2.0, r_r = 0.5 -> P = sigmoid(1.5) = 0.818, loss = 0.201.
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected) ** 2


def process_reward_loss(step_logits, step_labels, step_mask):
    """Process reward model loss (Lightman et al. 2023): binary cross-entropy of "this step is correct",
    one logit per step read at the step's separator token, averaged over all real steps of the batch:

        loss = mean_{steps s} BCE(sigmoid(logit_s), label_s)

    [B, S] tensors; step_mask marks real steps (rows have different numbers of steps)."""
    bce = F.binary_cross_entropy_with_logits(step_logits, step_labels.float(), reduction="none")
    return (bce * step_mask).sum() / step_mask.sum().clamp(min=1)


def sft_loss(logps, loss_mask, n_tokens):
    """Completion-only cross-entropy, token-level aggregation:

        loss = -sum_{t: mask_t = 1} log p(y_t | y_<t) / n_tokens

    `logps`, `loss_mask`: [B, T] per-token log-probs of the targets and the mask of trained tokens.
    `n_tokens` is the number of trained tokens in the whole optimizer step, not in this micro-batch:
    then the micro-batch losses of a step add up to the full batch's mean, and so do their gradients.
    """
    return -(logps * loss_mask).sum() / n_tokens
