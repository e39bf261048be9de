"""
Several processes (torchrun): joining the process group, and how the policy is spread over the ranks.

Full fine-tuning is sharded by PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard), per block and at
the root (the embedding, the final norm and an untied head): each rank holds 1/world of the fp32 masters,
of their gradients and of Adam's state, and gathers a block's weights only while the block runs, in the
forward and again in the backward. FSDP2 averages the gradients in its reduce-scatter by default; here it
sums them, so that the loss divided by the global batch R (rl.update, as on one process) gives the update
that one process makes on the whole batch (tests/test_distributed.py checks it).

A LoRA policy is not sharded: it is also the reference (adapters off) and the sampler (adapters on), one
copy of the frozen weights that every rank needs whole at every decoded token, and what it trains (the
adapters and their Adam state) is small. Its adapters' gradients are summed by one all-reduce
(all_reduce_grads), as are the demo base's (train_base.py).

Checkpoints stay those of one process (checkpoint.save): the weights and Adam's state whole, in the layout of
model.state_dict() and opt.state_dict(), gathered to rank 0 one tensor at a time (full_state); at a
resume each rank slices its shard from the whole state (load_optimizer), so a run written by N processes
resumes on M. FSDP2 and DTensor are imported only when the policy is sharded: their import takes half a
second, which every run on one process would pay.
"""
import functools
import gc
import os
import sys

import torch
import torch.distributed as dist


def setup_distributed(device):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): join the process group, one GPU per
    process (nccl) or CPU processes (gloo). Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    # First, before the group exists: torch.distributed.nn's functions take group=group.WORLD as a default,
    # evaluated when the module is imported, and torch._dynamo (which Adam's constructor imports) and FSDP2
    # import it. Imported after init_process_group, those ten defaults keep the group alive past
    # destroy_process_group; its gloo threads then outlive the interpreter's shutdown, and one that
    # releases a tensor then aborts the process ("terminate called without an active exception").
    import torch.distributed.nn  # noqa: F401
    cuda = str(device).startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def teardown():
    """Leave the process group with none of its threads left running: destroy_process_group, after clearing the
    caches of torch's DTensor (sharding propagation, redistribution plans, mesh topology), which key on the
    device mesh FSDP2 built, and the mesh holds the group. Kept alive, the group's gloo threads run into the
    interpreter's shutdown (see setup_distributed). Call it once the sharded model and its optimizer are gone."""
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
        gc.collect()  # the model's FSDP2 state (reference cycles)
        for f in gc.get_objects():
            if isinstance(f, functools._lru_cache_wrapper) and str(getattr(f, "__module__", "")).startswith("torch.distributed"):
                f.cache_clear()
        torch._C._clear_DTensor_sharding_propagator_cache()
        clear_redistribute_planner_cache()
        gc.collect()
        # torch 2.11: sharding strategies that a C++ cache still holds keep device meshes alive, and each mesh holds
        # its groups in a registry of its own; emptied, the group goes with destroy_process_group
        for m in gc.get_objects():
            if type(m).__name__ == "DeviceMesh" and isinstance(getattr(m, "_pg_registry", None), dict):
                m._pg_registry.clear()
    dist.destroy_process_group()


def shard(model):
    """Shard `model` (a GPT, in place) over the process group with FSDP2: each block, then the root. Build the
    optimizer after this: the parameters it holds are the shards."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    for m in (*model.layers, model):
        m.set_gradient_divide_factor(1.0)  # sum the ranks' gradients: the loss is already divided by the global batch
        m.set_force_sum_reduction_for_comms(True)  # as a plain SUM (gloo has no PREMUL_SUM, NCCL's zero-copy needs SUM)
    register_fsdp_forward_method(model, "hidden")  # the trainer calls hidden(), not forward(): gather the root there
    return model


def is_sharded(model):
    """Whether FSDP2 shards `model` (never where FSDP2 was not imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def full(t, sharded):
    """A parameter (or its optimizer state) whole: gathered from every rank's shard where `sharded` (a collective:
    every rank calls it, in the same order)."""
    return t.full_tensor() if sharded else t


def full_state(model, opt):
    """(weights, Adam's state) of a model that FSDP2 shards, whole, in the layout of one process's
    model.state_dict() and opt.state_dict() (Adam's state keyed by the parameter's index): gathered one tensor
    at a time (a collective: every rank calls it) to rank 0's CPU; the other ranks get (None, None). (A model
    every rank holds whole needs none of this: checkpoint.save writes it with save_pretrained and opt.state_dict().)"""
    rank0 = dist.get_rank() == 0

    def whole(t):  # every rank gathers; rank 0 keeps a CPU copy
        t = full(t, hasattr(t, "full_tensor"))
        return t.cpu() if rank0 else None
    weights = {n: whole(t) for n, t in model.state_dict().items()}
    saved = opt.state_dict()
    saved["state"] = {i: {k: whole(v) for k, v in s.items()} for i, s in saved["state"].items()}
    return (weights, saved) if rank0 else (None, None)


def load_optimizer(model, opt, saved):
    """Load Adam's state from a checkpoint (full_state's layout, whole tensors) into `opt`; where the model is
    sharded, each rank keeps its shard of each tensor (sliced from the whole one, no communication)."""
    if is_sharded(model):
        from torch.distributed.tensor import distribute_tensor
        params = [p for group in opt.param_groups for p in group["params"]]
        saved = {**saved, "state": {i: {k: distribute_tensor(v, params[i].device_mesh, params[i].placements,
                                                             src_data_rank=None) if v.shape == params[i].shape else v
                                        for k, v in s.items()} for i, s in saved["state"].items()}}
    opt.load_state_dict(saved)


def all_reduce_grads(model, average=False):
    """Sum (or average) the gradients of the trained parameters over all processes: one collective on a
    flat buffer (a LoRA policy's adapters, the demo base: models every rank holds whole)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)
