"""Mutation check of tests/test_bandit.py (not a test itself; pytest does not collect it):

    python tests/mutate_bandit.py        # 39 runs of the bandit tests: about 6 CPU-minutes

Each formula below is changed, one at a time, in a copy of the tree in a temporary directory (never
in the working tree), and tests/test_bandit.py runs there. A change that no test catches is printed
as SURVIVED: the tests would not notice that formula being wrong. See docs/derivations.md.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTS = [
    ("nanoalign/losses.py", "z = beta * ((pc - rc) - (pr - rr))\n    return -(1 - label_smoothing)",
     "z = beta * ((pc - rc) + (pr - rr))\n    return -(1 - label_smoothing)", "dpo: h sign of the rejected term"),
    ("nanoalign/losses.py", "z = beta * ((pc - rc) - (pr - rr))\n    return -(1 - label_smoothing)",
     "z = ((pc - rc) - (pr - rr))\n    return -(1 - label_smoothing)", "dpo: beta dropped"),
    ("nanoalign/losses.py", "return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2",
     "return ((pc - rc) - (pr - rr) - 1 / beta) ** 2", "ipo: target 1/beta"),
    ("nanoalign/losses.py", "rewards.std(-1, unbiased=False, keepdim=True)",
     "rewards.std(-1, unbiased=True, keepdim=True)", "grpo: sample std"),
    ("nanoalign/losses.py", "adv = rewards - mean if", "adv = rewards - 0.9 * mean if", "grpo: baseline scaled"),
    ("nanoalign/losses.py", "return torch.exp(d) - d - 1", "return torch.exp(d) - d", "k3: -1 dropped"),
    ("nanoalign/losses.py", "return torch.exp(d) - d - 1", "return torch.exp(d) + d - 1", "k3: sign of d"),
    ("nanoalign/losses.py", "loss = -torch.min(unclipped, clipped)", "loss = -torch.max(unclipped, clipped)",
     "ppo: max instead of min"),
    ("nanoalign/losses.py", "clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv",
     "clipped = ratio * adv", "ppo: no clip"),
    ("nanoalign/losses.py", "return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()",
     "return (token_loss * mask).sum(-1).mean()", "agg: seq_mean without the length"),
    ("nanoalign/losses.py", "return (token_loss * mask).sum() / (token_loss.shape[0] * max_len)",
     "return (token_loss * mask).sum() / mask.sum()", "agg: constant -> token mean"),
    ("nanoalign/losses.py", "delta = rewards[:, t] + gamma * next_value - values[:, t]",
     "delta = rewards[:, t] + next_value - values[:, t]", "gae: gamma dropped in delta"),
    ("nanoalign/losses.py", "last = (delta + gamma * lam * last)", "last = (delta + lam * last)",
     "gae: gamma dropped in the recursion"),
    ("nanoalign/losses.py", "return -F.logsigmoid(r_chosen - r_rejected - margin)",
     "return -F.logsigmoid(r_rejected - r_chosen - margin)", "bt: sign"),
    ("nanoalign/core.py", "rewards = -beta * kl * mask", "rewards = beta * kl * mask", "per-token KL reward sign"),
    ("nanoalign/core.py", "return score - beta * (logp - ref_logp)", "return score - beta * (ref_logp - logp)",
     "kl_penalized_reward sign"),
    ("nanoalign/bandit.py", "return ref_logp + r / beta - log_partition(ref_logp, r, beta)[:, None]",
     "return ref_logp + r / beta", "pi*: no log Z"),
    ("nanoalign/bandit.py", "torch.logsumexp(ref_logp + r / beta, -1)", "torch.logsumexp(ref_logp + r * beta, -1)",
     "log Z: r * beta"),
    ("nanoalign/bandit.py", "return (logp.exp() * r).sum(-1) - beta * kl(logp, ref_logp)",
     "return (logp.exp() * r).sum(-1) + beta * kl(logp, ref_logp)", "J: +KL"),
    ("nanoalign/bandit.py", "gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)",
     "gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=0.0)", "rlhf pg: immediate reward only"),
    ("nanoalign/bandit.py", "weight = tok.sum(-1).exp().detach()", "weight = tok.sum(-1).exp()",
     "rlhf pg: weight differentiated"),
    ("nanoalign/bandit.py", "(tok - ref_tok).detach(), mask, beta)", "(tok - ref_tok).detach(), mask, 2 * beta)",
     "rlhf pg: KL coefficient"),
    ("nanoalign/bandit.py", "torch.sigmoid(r[:, :, None] - r[:, None, :])",
     "torch.sigmoid(r[:, None, :] - r[:, :, None])", "pairs: labels reversed"),
    ("nanoalign/bandit.py", "return 2 * w / pairs.sum", "return w / pairs.sum", "pairs: not normalised"),
    ("nanoalign/bandit.py", "m = ref_logp[:, 0] - ref_logp[:, 1] + 1 / (2 * beta)",
     "m = ref_logp[:, 0] - ref_logp[:, 1] + 1 / beta", "ipo closed form: 1/beta"),
    ("nanoalign/bandit.py", "return -(old_logp.exp() * loss).sum(-1)", "return -(logp.exp() * loss).sum(-1)",
     "clip objective: weighted by the new policy"),
    ("nanoalign/bandit.py", "return torch.maximum(f(rho_min), f(rho_max))",
     "return torch.minimum(f(rho_min), f(rho_max))", "trust-region bound: min"),
    ("nanoalign/bandit.py", "ret, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)",
     "ret, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)", "exact values: gamma ignored"),
    ("nanoalign/bandit.py", "w = tok_logp[..., k:].sum(-1).exp()", "w = tok_logp[..., k + 1:].sum(-1).exp()",
     "conditional expectation: wrong suffix"),
    ("nanoalign/losses.py", "return 0.5 * (ref_logp - logp) ** 2", "return (ref_logp - logp) ** 2", "k2 without 1/2"),
    ("nanoalign/losses.py", "return logp - ref_logp\n", "return ref_logp - logp\n", "k1 sign"),
    ("nanoalign/bandit.py", "pn = F_ ** n - (F_ - p).clamp(min=0) ** n",
     "pn = F_ ** n - (F_ - p).clamp(min=0) ** (n - 1)", "best-of-n: exponent"),
    ("nanoalign/bandit.py", "pn = F_ ** n - (F_ - p).clamp(min=0) ** n", "pn = F_ ** n - F_.roll(1, -1) ** n",
     "best-of-n: previous F off by one (wraps)"),
    ("nanoalign/bandit.py", "return math.log(n) - (n - 1) / n", "return math.log(n) - (n - 1) / (n + 1)",
     "best-of-n bound"),
    ("nanoalign/bandit.py", "trained, frozen = 16, (2 if mixed else 4)", "trained, frozen = 12, (2 if mixed else 4)",
     "memory: 12 B/param trained"),
    ("nanoalign/bandit.py", "trained, frozen = 16, (2 if mixed else 4)", "trained, frozen = 16, 4",
     "memory: frozen fp32 in mixed"),
    ("nanoalign/bandit.py", "return n_layer * (12 * d * d + 13 * d)", "return n_layer * (12 * d * d + 12 * d)",
     "gpt_params: biases"),
    ("nanoalign/bandit.py", "return F.log_softmax(logits, -1)[:, prefix_nodes(V, L), sequences(V, L)]",
     "return F.log_softmax(logits, -1)[:, prefix_nodes(V, L).flip(0), sequences(V, L)]", "token_logps: wrong nodes"),
]


def run_tests(path=None, old=None, new=None):
    """Copy nanoalign/ and tests/ to a temporary directory, apply one change there, run the bandit
    tests; -> the names of the tests that failed."""
    root = tempfile.mkdtemp(prefix="mutate_bandit_")
    try:
        for d in ("nanoalign", "tests"):
            shutil.copytree(os.path.join(SRC, d), os.path.join(root, d),
                            ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        if path:
            f = os.path.join(root, path)
            s = open(f).read()
            assert s.count(old) == 1, (path, old, s.count(old))
            open(f, "w").write(s.replace(old, new))
        r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_bandit.py", "-q", "-p", "no:cacheprovider"],
                           cwd=root, capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE"))
        return sorted(set(re.sub(r"\[.*\]", "", m.split("::")[1]) for m in re.findall(r"FAILED (\S+)", r.stdout)))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    assert run_tests() == [], "the unchanged tree must pass first"
    results = []
    for path, old, new, name in MUTS:
        failed = run_tests(path, old, new)
        results.append((name, failed))
        print(f"{'CAUGHT  ' if failed else 'SURVIVED'} {name}: {', '.join(f.replace('test_', '', 1) for f in failed)}",
              flush=True)
    print(sum(bool(f) for _, f in results), "of", len(results), "changes caught")
    sys.exit(0 if all(f for _, f in results) else 1)
