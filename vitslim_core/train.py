"""The training loop shared by search and retrain: plain, resumable, DDP-ready.

One process per device; ``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK. Every rank sees its slice of
the same *global* batches as a single-process run (``GlobalBatchSampler``), gradients are averaged by
DDP, so a run gives the same result on 1 or N processes. Checkpoints hold everything needed to
continue bit-for-bit: weights, optimizer, step, RNG states, history.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import VitSlimError
from .io import atomic_save, remove_stale_temps
from .masks import is_mask_param


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1


DEVICE_TYPES = ("cpu", "cuda")


def check_device(device: Any) -> str:
    """A device name the engine can train and evaluate on: auto, cpu, cuda or cuda:N (one-line error otherwise;
    meta, mps and others would fail later with errors no user can read)."""
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise VitSlimError(f"not a usable device: {str(device)[:40]!r} (use auto, cpu, cuda or cuda:N)")
    return str(device)


def resolve_device(device: str = "auto") -> str:
    """auto -> cuda when a GPU is visible, else cpu; asking for CUDA without a GPU is a clear error."""
    device = check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise VitSlimError(f"--device {device}: no CUDA GPU is visible to PyTorch (use --device cpu)")
    return device


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when RANK/WORLD_SIZE are set; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if world <= 1:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", 0)
        return DistInfo(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch of a seeded per-epoch permutation.

    Rank r of W gets items [r*b:(r+1)*b] of every global batch of size W*b, so the union over ranks
    is exactly what a single process with batch W*b sees. ``start`` skips batches already done
    (resume in the middle of an epoch).
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        if global_batch % world:
            raise VitSlimError(f"batch size {global_batch} is not divisible by {world} processes")
        self.n, self.gb, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        full = self.n // self.gb
        return (full if self.drop_last or self.n % self.gb == 0 else full + 1) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        b = self.gb // self.world
        for i in range(self.start, self.start + len(self)):
            batch = order[i * self.gb:(i + 1) * self.gb]
            yield batch[self.rank * b:(self.rank + 1) * b] if len(batch) == self.gb else batch[self.rank::self.world]


def steps_per_epoch(n: int, global_batch: int) -> int:
    steps = n // global_batch
    if steps == 0:
        raise VitSlimError(f"the training set has {n} images, fewer than one batch of {global_batch}")
    return steps


def make_loader(dataset: Dataset, sampler: Sampler, num_workers: int, device: torch.device,
                seed: int) -> DataLoader:
    # a private generator keeps the global RNG untouched, so resuming replays the same random draws
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False)


# ----------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, weight_decay: float, lr: float, mask_lr: float | None,
                 trainable: Callable[[str, nn.Parameter], bool] | None = None) -> list[dict]:
    """AdamW groups: weights with decay; norms, biases, tokens, pos embeds without; masks on their own."""
    decay, no_decay, masks = [], [], []
    for name, p in model.named_parameters():
        if trainable is not None and not trainable(name, p):
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        if is_mask_param(name):
            masks.append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": "no_decay"}]
    if masks:
        groups.append({"params": masks, "weight_decay": 0.0, "lr": mask_lr or lr, "name": "masks"})
    return [g for g in groups if g["params"]]


SCHEDULES = ("cosine", "constant")


class CosineSchedule:
    """Linear warm-up then cosine decay (or a constant rate), by optimizer step; each group keeps its own
    base lr."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.01, schedule: str = "cosine") -> None:
        if schedule not in SCHEDULES:
            raise VitSlimError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.opt, self.total, self.warmup, self.min_ratio = optimizer, max(1, total_steps), warmup_steps, min_lr_ratio
        self.constant = schedule == "constant"
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.constant:
            return 1.0
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def step(self, step: int) -> float:
        f = self.factor(step)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        return f


# ----------------------------------------------------------------------------- checkpoints
def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed every RNG from (seed, rank, step): a resumed run replays the same dropout/mixup draws."""
    import numpy as np
    s = (seed * 1_000_003 + rank * 7_919 + step) % (2**31)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_save(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` (no arbitrary unpickling)."""
    if not Path(path).is_file():
        raise VitSlimError(f"no checkpoint to resume from at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable checkpoint
        raise VitSlimError(f"checkpoint {path} is damaged or not a vitslim checkpoint "
                           f"({type(e).__name__})") from None


def strip_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """State dict keys of a ``torch.compile``-d module (``_orig_mod.`` prefix) as the plain module's."""
    pre = "_orig_mod."
    return {(k[len(pre):] if k.startswith(pre) else k): v for k, v in state.items()}


def upgrade_optimizer_state(saved: dict[str, Any], opt: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state of a checkpoint written before the scores of each dimension became one
    parameter: its "masks" group holds one parameter per layer and dimension (k * L) where the optimizer
    now has one per dimension (k); the per-layer moments are stacked, in the same order as the scores."""
    groups = saved.get("param_groups", [])
    if len(groups) != len(opt.param_groups) or all(
            len(g["params"]) == len(h["params"]) for g, h in zip(groups, opt.param_groups)):
        return saved
    state, new_state, new_groups, nxt = saved.get("state", {}), {}, [], 0
    for g, h in zip(groups, opt.param_groups):
        old, n = list(g["params"]), len(h["params"])
        if len(old) != n:
            if g.get("name") != "masks" or n == 0 or len(old) % n:
                return saved  # not ours to fix: load_state_dict says why it does not fit
            L = len(old) // n
            chunks = [old[i * L:(i + 1) * L] for i in range(n)]
        else:
            chunks = [[i] for i in old]
        ids = []
        for chunk in chunks:
            parts = [state[i] for i in chunk if i in state]
            if len(parts) == len(chunk) and parts:
                new_state[nxt] = {k: (torch.stack([p[k] for p in parts]) if len(chunk) > 1 and p0.ndim > 0
                                      else p0.clone()) for k, p0 in parts[0].items()}
            ids.append(nxt)
            nxt += 1
        new_groups.append({**g, "params": ids})
    return {"state": new_state, "param_groups": new_groups}


class CompiledModel(nn.Module):
    """``torch.compile`` of a whole model call, its forward hooks included (the masks' per-step factors
    then join the model's graph instead of becoming a graph of their own).

    The compiled module shares the model's parameters; it is only called, never saved (its state_dict
    keys carry ``_orig_mod.``, as torch's own compiled modules do; ``strip_compile_prefix`` removes it).
    When the first call cannot compile, one warning says so and the model runs eagerly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model
        self._compiled = torch.compile(lambda *a, **k: model(*a, **k))
        self._failed = False
        self._first = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._failed:
            return self._orig_mod(*args, **kwargs)
        if not self._first:
            return self._compiled(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly, say so once
            import warnings
            self._failed = True
            warnings.warn(f"--compile: torch.compile failed on this platform ({_first_line(e)}); running eagerly",
                          RuntimeWarning, stacklevel=2)
            return self._orig_mod(*args, **kwargs)
        self._first = False
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:120] if text else type(e).__name__)


def compile_problem(device: torch.device | str = "cpu") -> str | None:
    """Why torch.compile cannot work here, or None (checked before training, so the fallback is clean)."""
    import shutil
    try:
        import torch._dynamo as dynamo
        if not dynamo.is_dynamo_supported():
            return "TorchDynamo does not support this Python"
    except Exception as e:  # noqa: BLE001
        return f"torch._dynamo is unavailable ({_first_line(e)})"
    if torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            return "Triton is not installed"
    elif not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
        return "no C++ compiler (inductor needs one on CPU)"
    return None


def compile_model(model: nn.Module) -> nn.Module:
    """``CompiledModel(model)``, or ``model`` itself (with one warning) where this platform cannot compile."""
    device = next(model.parameters()).device
    problem = compile_problem(device)
    if problem is not None:
        import warnings
        warnings.warn(f"--compile: {problem}; running eagerly", RuntimeWarning, stacklevel=2)
        return model
    return CompiledModel(model)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 128, device: str | torch.device = "cpu",
             num_workers: int = 0, dist_info: DistInfo | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy (in %) and mean cross-entropy of a model on a dataset.

    Under DDP every rank evaluates its shard and the sums are all-reduced.
    """
    device = torch.device(device)
    di = dist_info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    idx = list(range(di.rank, len(dataset), di.world))
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, n
    total = len(loader)
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), F.cross_entropy(logits, y, reduction="sum"),
                             torch.tensor(float(len(y)), device=device)]).double()
        if progress is not None:
            progress(i + 1, total)
    if di.ddp:
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(1.0, float(sums[3]))
    return {"top1": 100 * float(sums[0]) / n, "top5": 100 * float(sums[1]) / n, "loss": float(sums[2]) / n,
            "n": int(sums[3])}


def autocast(device: str | torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (fp16 where bf16 is missing); a no-op on CPU."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the loop
@dataclass
class LoopConfig:
    """Settings of the shared loop (search and retrain extend these)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    min_lr_ratio: float = 0.01
    schedule: str = "cosine"
    recipe: str | None = None  # a named preset these settings came from (recipes.py), for the record
    weight_decay: float = 0.05
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    grad_clip: float = 0.0
    max_steps: int = 0
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    eval_batch_size: int = 128
    compile: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


class Stopped(Exception):
    """Raised inside the loop when the caller asked it to stop (the last checkpoint is kept)."""


def run_loop(model: nn.Module, step_fn: StepFn, train_set: Dataset, test_set: Dataset | None,
             cfg: LoopConfig, run_dir: Path, groups: list[dict], di: DistInfo, *, resume: bool = False,
             on_log: Callable[[dict], None] | None = None, on_checkpoint: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] | None = None, desc: str = "train",
             eval_split: str = "test") -> dict[str, Any]:
    """Train ``model`` (already on ``di.device``) with AdamW and the cosine schedule.

    Args:
        step_fn: ``(model, x, y) -> (loss, logs)``; logs are floats shown in the bar and the history.
        groups: optimizer parameter groups (see ``param_groups``).
        resume: continue from ``run_dir/checkpoint.pt``.
        on_log: called on the master with every history record (the app draws live curves).
        on_checkpoint: called on the master after each checkpoint with the history.
        should_stop: polled every step; True stops cleanly after saving a checkpoint.
        eval_split: what ``test_set`` is ("test" or "val"), recorded in every evaluation record.

    Returns:
        The history dict: ``log`` (per log_every steps), ``eval`` (per epoch), ``complete``.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    raw = model
    if di.ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    if cfg.compile:
        model = compile_model(model)
    # foreach: one multi-tensor kernel per update rule instead of ~10 ops per parameter (also on CPU)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), foreach=True)
    spe = steps_per_epoch(len(train_set), cfg.batch_size)
    total = cfg.epochs * spe if cfg.max_steps <= 0 else min(cfg.max_steps, cfg.epochs * spe)
    warmup = cfg.warmup_steps + int(round(cfg.warmup_epochs * spe))
    sched = CosineSchedule(opt, total, warmup, cfg.min_lr_ratio, cfg.schedule)
    use_amp = cfg.amp and di.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
    history: dict[str, Any] = {"log": [], "eval": [], "complete": False, "total_steps": total,
                               "steps_per_epoch": spe, "world_size": di.world}
    step = 0
    if di.master:
        remove_stale_temps(run_dir)  # what a killed run left half-written (never read: see io.atomic_path)
    if resume:
        st = load_checkpoint(ckpt_path)
        try:
            raw.load_state_dict(strip_compile_prefix(st["model"]), strict=True)
            opt.load_state_dict(upgrade_optimizer_state(st["optimizer"], opt))
        except (RuntimeError, ValueError, KeyError) as e:
            raise VitSlimError(f"checkpoint {ckpt_path} does not fit this model/config ({str(e).splitlines()[0][:100]})") from None
        scaler.load_state_dict(st.get("scaler", {})) if st.get("scaler") else None
        step = int(st["step"])
        history = st["history"]
        window = list(st.get("window") or [])
        if di.master:
            # a SIGKILL can leave the files written after the checkpoint (run folder, best/, last/)
            # older than it: rewrite them from the checkpoint's state
            if on_checkpoint is not None:
                on_checkpoint(history)
        if di.ddp:
            dist.barrier()
    else:
        window = []

    sampler = GlobalBatchSampler(len(train_set), cfg.batch_size, di.rank, di.world, seed=cfg.seed)
    bar = tqdm(total=total, initial=step, desc=desc, disable=not di.master or not _bar_enabled(), dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    seconds_before = float(history.get("train_seconds", 0.0))  # of the segments before a resume
    model.train()

    def checkpoint() -> None:
        history["step"] = step
        history["train_seconds"] = seconds_before + (time.perf_counter() - t0)
        if di.master:
            # the checkpoint first, then (on_checkpoint) the files derived from it: a kill in between
            # is repaired on resume, which rewrites them from the checkpoint
            save_checkpoint(ckpt_path, {"model": raw.state_dict(), "optimizer": opt.state_dict(),
                                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                                        "step": step, "history": history, "window": window,
                                        "config": _plain(cfg.to_dict())})
            if on_checkpoint is not None:
                on_checkpoint(history)
        if di.ddp:
            dist.barrier()

    try:
        while step < total:
            epoch, start = divmod(step, spe)
            sampler.set_epoch(epoch, start)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            loader = make_loader(train_set, sampler, cfg.num_workers, di.device, cfg.seed + epoch)
            for x, y in loader:
                if should_stop is not None and should_stop():
                    raise Stopped()
                x, y = x.to(di.device, non_blocking=True), y.to(di.device, non_blocking=True)
                sched.step(step)
                seed_step(cfg.seed, di.rank, step)
                with autocast(di.device, use_amp):
                    loss, logs = step_fn(model, x, y)
                if not torch.isfinite(loss):
                    raise VitSlimError(f"the loss became {loss.item()} at step {step}: lower the learning rate")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                step += 1
                seen += x.shape[0] * di.world
                window.append({"loss": float(loss.detach()), **logs})
                if step % cfg.log_every == 0 or step == total or step % spe == 0:
                    rec = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                    rec.update(step=step, epoch=step / spe, lr=opt.param_groups[0]["lr"],
                               images_per_s=seen / max(1e-9, time.perf_counter() - t0))
                    window.clear()
                    history["log"].append(rec)
                    bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in rec.items()
                                     if k in ("loss", "acc", "attn", "mlp", "token")}, refresh=False)
                    if on_log is not None and di.master:
                        on_log(rec)
                bar.update(1)
                if (step % spe == 0 or step == total) and test_set is not None:
                    ev = evaluate(raw, test_set, cfg.eval_batch_size, di.device, cfg.num_workers, di)
                    ev.update(step=step, epoch=step // spe, split=eval_split)
                    history["eval"].append(ev)
                    if on_log is not None and di.master:
                        on_log({"eval": ev, "step": step})
                    model.train()
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step % spe == 0 or step == total:
                    checkpoint()
                if step >= total:
                    break
    except Stopped:
        checkpoint()
        history["stopped"] = True
    finally:
        bar.close()
    history["complete"] = step >= total
    history["step"] = step
    history["train_seconds"] = seconds_before + (time.perf_counter() - t0)
    return history


def _bar_enabled() -> bool:
    return os.environ.get("VITSLIM_NO_PROGRESS", "") in ("", "0")


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def make_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
    """timm's Mixup/CutMix (with label smoothing folded into the targets), or None when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


def task_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mixup, label_smoothing: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Cross-entropy of ``model`` on a batch, mixed by ``mixup`` when given (even batches only).

    Returns:
        ``(loss, logits, model input, logs)``; logs has the batch accuracy when the batch was not mixed.
    """
    if mixup is not None and x.shape[0] % 2 == 0:
        x_in, target = mixup(x, y)
        logits = model(x_in)
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean(), logits, x_in, {}
    logits = model(x)
    acc = 100.0 * float((logits.argmax(1) == y).float().mean())
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits, x, {"acc": acc}


def supervised_step(teacher: nn.Module | None = None, mixup=None, label_smoothing: float = 0.0,
                    distill_tau: float = 1.0, distill_alpha: float = 0.5, hard: bool = False) -> "StepFn":
    """The step of every supervised (re)training: cross-entropy (mixed by ``mixup``), optionally blended
    with distillation from ``teacher`` (soft at ``distill_tau``, or ``hard`` argmax targets)."""
    def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        task, logits, x_in, logs = task_loss(model, x, y, mixup, label_smoothing)
        loss = task
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x_in)
            kd = distill_loss(logits, t_logits, distill_tau, hard=hard)
            loss = (1 - distill_alpha) * task + distill_alpha * kd
            logs["distill"] = float(kd.detach())
        logs["task_loss"] = float(task.detach())
        return loss, logs
    return step_fn


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
                 hard: bool = False) -> torch.Tensor:
    """Soft (KL at temperature tau) or hard (cross-entropy on the teacher's argmax) distillation."""
    if hard:
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
    return F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                    reduction="batchmean", log_target=True) * tau * tau
