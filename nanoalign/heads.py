"""
Scalar heads on a GPT body: reward models (outcome and process) and value models (critics).

One module serves all three: a linear head mapping each final hidden state to one scalar.
- outcome reward: the scalar at the last real token of prompt + response (the EOS), `reward()`;
- process reward: the scalars at the step-separator tokens, one logit of "this step is correct" each;
- value / critic: the scalar at every token, `forward()`.

Optionally (`top_blocks` > 0) fresh transformer blocks sit between the body and the head, and they read,
besides the body's hidden states, each token's log-prob under the body's own language-model head,
log p(x_t | x_<t). Why: a small body can tell how likely each written token is only through its LM
head (the dot product of the state before a token with that token's embedding); no hidden state holds
it, and a reward head alone cannot learn it quickly from outcome labels (README, reward models).
"""
import torch
import torch.nn as nn

from nanoalign.core import gather_last, scored_logprobs
from nanoalign.model import Block, positions_and_attention


def input_logprobs(gpt, h, ids, mask=None):
    """log p(x_t | x_<t) of every token under `gpt`'s LM head, from its final hidden states h [B, T, C];
    0 where the token before is not a real one (the first token, any padding). [B, T], float32."""
    B, T = ids.shape
    both_real = torch.ones(B, T - 1, dtype=torch.bool, device=ids.device) if mask is None else \
        mask[:, 1:].bool() & mask[:, :-1].bool()
    lp = scored_logprobs(h, gpt.lm_head.weight, ids, both_real)  # chunked: never the [B, T, V] logits
    return torch.cat([lp.new_zeros(B, 1), lp], 1)


class ScalarModel(nn.Module):
    def __init__(self, gpt, top_blocks=0):
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        C = gpt.config.n_embd
        self.top = nn.ModuleList([Block(gpt.config, gpt.config.n_layer + i) for i in range(top_blocks)])
        if top_blocks:
            self.top.apply(gpt._init_weights)  # GPT-2's init, as the body's blocks had before training
            self.logp_embed = nn.Parameter(torch.randn(C) / C ** 0.5)  # log p(x_t) enters as lp * this vector
            self.ln_top = nn.LayerNorm(C, bias=gpt.config.bias)
        self.head = nn.Linear(C, 1)
        nn.init.zeros_(self.head.weight)  # every reward starts at 0: the first loss is exactly log 2
        nn.init.zeros_(self.head.bias)
        # normalisation set after training (train_rm.py): reward = gain * raw + bias
        self.register_buffer("gain", torch.tensor(1.0))
        self.register_buffer("bias", torch.tensor(0.0))

    def forward(self, ids, mask=None):
        """One raw scalar per token, float32. [B, T] -> [B, T]."""
        h = self.gpt.body(ids, mask)
        if len(self.top):
            h = h + input_logprobs(self.gpt, h, ids, mask).to(h.dtype)[..., None] * self.logp_embed
            attn = None if mask is None else positions_and_attention(mask.bool())[1]
            for block in self.top:
                h = block(h, attn)
            h = self.ln_top(h)
        return self.head(h).squeeze(-1).float()

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
