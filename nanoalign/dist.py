"""
Data parallelism under torchrun: N processes (ranks), one per device, each on its share of every step.

    torchrun --standalone --nproc_per_node=8 train_sft.py ...      # see docs/distributed.md

Under plain `python` (WORLD_SIZE unset or 1) every function here is the identity and no collective runs,
so the single-process path is exactly what it was. Under torchrun:
- The global batch is the one process's batch: every rank draws the whole step's examples from (seed, step)
  and takes its contiguous share (`shard`), so N ranks see the examples one process would, and resume stays
  exact. Each loss is divided by the whole step's count (SFT's tokens, DPO's pairs, ...), so every rank's
  loss is its share of the step's loss and the step's gradient is the SUM of the ranks' gradients
  (`reduce_gradients`, called by utils.optimizer_step once per step, before clipping).
- Why by hand rather than DistributedDataParallel: DDP's gradient hooks fire only through the wrapped
  module's forward, and the stages call `model.body` / `model.lm_head` directly (PPO's shared critic, the
  chunked log-probs); a sum after the backward is exact whatever the call pattern (LoRA, frozen weights,
  torch.compile, gradient accumulation), and replaces `no_sync`: one all-reduce per optimizer step.
- RL stages sample their share of the rollouts and all-gather them (`all_gather_cat`), so advantages,
  whitening, KL control and the logged statistics are computed on the whole batch, as in one process.
- Rank 0 alone writes logs, checkpoints and summaries (guards in utils.py) and prints (stdout of the
  other ranks goes to /dev/null; their errors still reach stderr).
"""
import atexit
import os
import sys

import torch
import torch.distributed as tdist

_rank, _world, _device = 0, 1, "cpu"


def setup(device):
    """Join the torchrun job if there is one: -> (rank, world, device). NCCL on GPUs (each rank on
    cuda:LOCAL_RANK, whatever cuda device was asked for), gloo on CPU. Without torchrun: (0, 1, device)."""
    global _rank, _world, _device
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or tdist.is_initialized():
        return _rank, _world, device if _world == 1 else _device
    _rank, _world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    _device = device
    tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    atexit.register(cleanup)
    if _rank:  # one copy of every print and progress line: rank 0's
        sys.stdout = open(os.devnull, "w")
    return _rank, _world, device


def cleanup():
    if tdist.is_initialized():
        tdist.destroy_process_group()


def rank():
    return _rank


def world():
    return _world


def is_main():
    """Whether this process writes logs, checkpoints and summaries (rank 0, or the only process)."""
    return _rank == 0


def share(n, group=1, what="the batch"):
    """The slice of rows this rank owns of a batch of n units of `group` rows each (a GRPO group of G samples
    is one unit: it never spans ranks). n must divide evenly (utils.ConfigError otherwise)."""
    if _world == 1:
        return slice(0, n * group)
    if n % _world:
        from nanoalign.utils import ConfigError  # (utils imports this module)
        raise ConfigError(f"{what} ({n}) cannot be split evenly over {_world} processes: make it a multiple of {_world}")
    per = n // _world * group
    return slice(_rank * per, (_rank + 1) * per)


def shard(items, what="the batch", even=True):
    """This rank's contiguous share of a step's items (a list or a tensor); all of them in one process.
    even=False allows a remainder (the first ranks get one more; a share may be empty)."""
    if _world == 1:
        return items
    if even:
        return items[share(len(items), what=what)]
    n = len(items)
    return items[n * _rank // _world:n * (_rank + 1) // _world]


def _comm_device():
    """Where collectives run: this rank's GPU with NCCL, the CPU with gloo."""
    return torch.device(_device if _device.startswith("cuda") else "cpu")


def all_reduce(x, op="sum"):
    """x summed (or "max") over the ranks: a number, a tensor, or a dict of numbers (one collective)."""
    if _world == 1:
        return x
    if isinstance(x, dict):
        return dict(zip(x, all_reduce(torch.tensor([float(v) for v in x.values()], dtype=torch.float64), op).tolist()))
    if not torch.is_tensor(x):
        return type(x)(all_reduce(torch.tensor(x, dtype=torch.float64), op).item())
    t = x.detach().to(_comm_device(), copy=True)
    tdist.all_reduce(t, tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
    return t.to(x.device)


def all_gather_cat(t, pad_value=0):
    """Every rank's tensor concatenated along dim 0 in rank order (equal shares: the whole batch, in the
    order of one process). Dim 1 (a response's length) is padded with pad_value to the longest rank's."""
    if _world == 1:
        return t
    dtype, x = t.dtype, t.to(_comm_device())
    x = x.to(torch.uint8) if dtype == torch.bool else x  # gloo has no bool collectives
    if x.dim() > 1:
        width = all_reduce(x.shape[1], "max")
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]), value=pad_value)
    parts = [torch.empty_like(x) for _ in range(_world)]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts).to(t.device, dtype)


def all_gather_objects(obj):
    """[rank 0's obj, rank 1's, ...] (any picklable object); [obj] in one process."""
    if _world == 1:
        return [obj]
    out = [None] * _world
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """Rank src's obj on every rank (what the others pass is ignored)."""
    if _world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src)
    return box[0]


def reduce_gradients(params, bucket_numel=2 ** 24):
    """Sum every parameter's gradient over the ranks, in place: once per optimizer step, after the last
    backward and before unscaling and clipping (then every rank holds the same gradient and takes the same
    step, and the weights stay identical). A SUM, not a mean: each rank's loss is already divided by the
    whole step's count. A parameter that got no gradient on any rank keeps None, as in one process (AdamW
    skips it); one that got none on this rank only (its share held nothing for it) counts as zero."""
    if _world == 1:
        return
    params = [p for p in params if p.requires_grad]
    dev = _comm_device()
    has = all_reduce(torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev))
    grads = []
    for p, h in zip(params, has.tolist()):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    # flattened buckets: a few large all-reduces, not one per tensor (grads share a dtype per bucket)
    while grads:
        bucket, n = [], 0
        while grads and (not bucket or (n + grads[0].numel() <= bucket_numel and grads[0].dtype == bucket[0].dtype)):
            bucket.append(grads.pop(0))
            n += bucket[-1].numel()
        flat = torch.cat([g.reshape(-1) for g in bucket]).to(dev)
        tdist.all_reduce(flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
