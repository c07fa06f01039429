"""
Scalar heads on a GPT body: reward models (outcome and process) and value models (critics).

One module serves all three: a linear head mapping each final hidden state to one scalar.
- outcome reward: the scalar at the last real token of prompt + response (the EOS), `reward()`;
- process reward: the scalars at the step-separator tokens, one logit of "this step is correct" each;
- value / critic: the scalar at every token, `forward()`.
"""
import torch
import torch.nn as nn

from nanoalign.core import gather_last


class ScalarModel(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)  # every reward starts at 0: the first loss is exactly log 2
        nn.init.zeros_(self.head.bias)
        # normalisation set after training (train_rm.py): reward = gain * raw + bias
        self.register_buffer("gain", torch.tensor(1.0))
        self.register_buffer("bias", torch.tensor(0.0))

    def forward(self, ids, mask=None):
        """One raw scalar per token, float32. [B, T] -> [B, T]."""
        return self.head(self.gpt.body(ids, mask)).squeeze(-1).float()

    @torch.no_grad()
    def set_normalisation(self, raw):
        """Choose gain and bias so that these raw rewards (e.g. of the policy's own samples) get
        mean 0 and standard deviation 1 (population std): reward = (raw - mean) / std."""
        mean, std = raw.mean(), raw.std(unbiased=False).clamp(min=1e-8)
        self.gain.fill_(1.0 / std.item())
        self.bias.fill_(-mean.item() / std.item())

    def reward(self, ids, mask):
        """The normalised scalar at each row's last real token (any padding side). [B, T] -> [B]."""
        return self.gain * gather_last(self(ids, mask), mask) + self.bias
