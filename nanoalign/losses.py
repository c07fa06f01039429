"""
Loss functions: pure functions of per-sequence (or per-token) tensors, each with its equation.
Every function returns the per-example loss; the caller chooses the aggregation (usually .mean()).
"""
import torch.nn.functional as F


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0):
    """Reward-model loss under the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022):

        P(chosen > rejected) = sigmoid(r_c - r_r)
        loss = -log sigmoid(r_c - r_r - margin)

    `margin` (a scalar or one per pair, Llama 2) demands a larger gap for pairs rated far apart.
    Example: r_c = 2.0, r_r = 0.5 -> P = sigmoid(1.5) = 0.818, loss = 0.201.
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin)
