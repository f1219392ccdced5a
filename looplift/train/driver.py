"""The training driver: steps, data parallel, progress, checkpoints, and a resume that is exact.

`Trainer` works for any `torch.nn.Module`: the model's loss is the user's
``loss_fn(model, batch) -> (loss_sum, count)``, the data is the user's
``make_batches(epoch) -> list of batches``; `bucketed_batches` makes such a
list of example indices, length-bucketed and sharded for data parallel.

Why it is shaped this way:

- **A loss sum and a count, not a mean.** Each step divides the loss summed
  over all ranks' shards by the count summed over all ranks (all-reduced), so
  one step's gradient is that of the mean over the whole global batch,
  whatever the split: each rank backpropagates ``loss_sum / global_count *
  world_size`` and DDP's averaging over ``world_size`` ranks cancels the
  factor. A per-rank mean would weight short shards' items more.
- **DDP wraps a tiny module whose forward is ``loss_fn(model, batch)``.** DDP
  all-reduces gradients from hooks on each parameter's gradient accumulator,
  so they fire whichever way ``loss_fn`` uses the parameters, a compiled
  looplift program included (`tests/test_train_driver.py` checks this against
  one process on the combined batches). All-reducing gradients by hand after
  ``backward`` was the alternative; it cannot overlap communication with the
  backward pass. ``loss_fn`` always gets the plain model.
- **One checkpoint file, written atomically.** ``last.safetensors`` holds the
  model, optimizer, scheduler, RNG states and data position together, so a
  crash can never leave them disagreeing. Model parameters keep their plain
  names; everything else is under the ``trainer/`` prefix, which a module name
  cannot start with. `load_model` reads the model part of it (or of any
  model-only file); ``looplift.load`` reads ``model.safetensors``, the
  model-only copy written beside it for evaluation tools.
- **Evaluation does not touch the training RNG streams.** The RNG states are
  saved before ``evaluate`` and restored after it, so training computes the
  same whether, and at which steps, it was evaluated: a run stopped and
  resumed is bit-identical to one that was not stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save as _save_bytes
from tqdm import tqdm

from ..errors import ArgumentError, CheckpointError, ConfigError, entry_methods
from .checkpoint import atomic_write, copy_into, cpu_state, mismatches
from .distributed import LossFn, LossOfModel, init_distributed
from .trainer_state import (
    AVERAGE_FILE,
    BEST_FILE,
    EPOCHS_DIR,
    FORMAT,
    LAST_CHECKPOINT,
    MODEL_FILE,
    PREFIX,
    class_name,
    decode,
    encode,
    read_file,
    rng_state,
    set_rng_state,
)

__all__ = ["Trainer", "LossFn"]


@dataclass
class _Totals:
    """What the steps of the current epoch added up to (over all ranks)."""
    loss_sum: float = 0.0
    count: float = 0.0
    seconds: float = 0.0
    steps: int = 0


class Trainer:
    """Trains `model` step by step: data parallel under torchrun, with progress, checkpoints and exact resume.

    Args:
        model: any module; its parameters and persistent buffers are checkpointed.
        loss_fn: ``loss_fn(model, batch) -> (loss_sum, count)``: the loss summed
            over the batch (a scalar tensor) and the number of items it is
            normalized by (target tokens, say; an int, float or tensor). A step
            minimizes ``sum of loss_sum / sum of count``, summed over all ranks.
        optimizer: over parameters of `model` only.
        scheduler: a ``torch.optim.lr_scheduler`` stepped (without arguments)
            after every optimizer step; not ``ReduceLROnPlateau``.
        clip_norm: the gradient's total norm is clipped to this (after the
            ranks' gradients are averaged); None: no clipping.
        checkpoint_dir: where ``last.safetensors`` (everything, for resume)
            and ``model.safetensors`` (the model only) are written; None:
            no checkpoints.
        metadata: strings stored in every checkpoint (the model config as
            JSON, say); keys must not start with ``"trainer/"``.
        progress: show a progress bar and a line per epoch on stderr (rank 0
            only); ``"epochs"``: only the line per epoch; False: nothing.
        ddp_options: keyword arguments for ``DistributedDataParallel``, e.g.
            ``{"find_unused_parameters": True}`` for a model with parameters
            that some steps do not use.
        keep_best: the name of a result of ``fit``'s `evaluate` to minimize
            (``"dev_wer"``, say): whenever an evaluation gives it a value below
            every earlier one, the model is written to ``best.safetensors`` in
            `checkpoint_dir` (with the metadata, and ``"best"``: the result, its
            value, epoch and step, as JSON); resumed runs remember the best.
        average_last: after each epoch, the model's parameters averaged over
            the ends of the last this many epochs (the end of a run stopped
            within an epoch counts as that epoch's end) are written to
            ``average.safetensors`` in `checkpoint_dir` (with the metadata, and
            ``"average"``: the epochs averaged, as JSON). The models at those
            epochs' ends are kept in ``checkpoint_dir/epochs/`` (older ones are
            deleted), so a resumed run averages the same. Entries that are not
            floating point (counters) are the last epoch's.

    Data parallel: if ``torch.distributed`` is initialized with more than one
    process, or the environment says ``WORLD_SIZE > 1`` (as under
    ``torchrun``; the process group is then initialized here, ``nccl`` for a
    model on CUDA, which must be on the rank's device, and ``gloo`` for one
    on the CPU), the model is wrapped in ``DistributedDataParallel`` (which
    makes its parameters rank 0's) and `rank` and `world_size` say which part
    of the data this process takes: pass them to `bucketed_batches`.

    The position (`epoch`, `step_in_epoch`, `global_step`, `elapsed_seconds`)
    and `history` live in the trainer: calling `fit` again continues.

    `budget_done` is the fraction of the running `fit`'s budget behind it (0 to 1),
    for a schedule over the whole run, e.g. a learning rate that decays to
    zero as a time budget runs out::

        scheduler = LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * trainer.budget_done)))
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, *,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, clip_norm: float | None = 1.0,
                 checkpoint_dir: str | os.PathLike | None = None, metadata: Mapping[str, str] | None = None,
                 progress: bool | str = True, ddp_options: Mapping[str, Any] | None = None,
                 keep_best: str | None = None, average_last: int | None = None):
        if not isinstance(model, torch.nn.Module):
            raise ArgumentError(f"Trainer needs the model (a looplift.Module) first, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ArgumentError(f"Trainer: loss_fn must be a function loss_fn(model, batch) -> (loss_sum, count), "
                                f"got {type(loss_fn).__name__}")
        if isinstance(optimizer, type):
            raise ArgumentError(f"Trainer needs an optimizer, not the class {optimizer.__name__}: "
                                f"{optimizer.__name__}(model.parameters(), lr=...)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentError(f"Trainer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float))
                                      or not clip_norm > 0):
            raise ConfigError(f"Trainer: clip_norm must be a positive number (or None: no clipping), "
                              f"got {clip_norm!r}")
        metadata = dict(metadata or {})
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"metadata must map strings to strings; not so for the keys {bad!r}")
        reserved = [k for k in metadata if k.startswith(PREFIX)]
        if reserved:
            raise ValueError(f"metadata keys starting with {PREFIX!r} are the trainer's own: {reserved!r}")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError("ReduceLROnPlateau needs a metric to step; the trainer steps its scheduler after "
                            "every optimizer step without one: use a step-based scheduler")
        names = {id(p): name for name, p in model.named_parameters()}
        foreign = sum(id(p) not in names for group in optimizer.param_groups for p in group["params"])
        if foreign:
            raise ValueError(f"the optimizer updates {foreign} tensors that are not parameters of the model: "
                             f"they would be neither checkpointed nor synchronised")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clip_norm = clip_norm
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.metadata = metadata
        if keep_best is not None and (not isinstance(keep_best, str) or checkpoint_dir is None):
            raise ConfigError(f"keep_best names an evaluation result (a str) and needs a checkpoint_dir, got "
                              f"keep_best={keep_best!r}, checkpoint_dir={checkpoint_dir!r}")
        self.keep_best = keep_best
        if average_last is not None and (isinstance(average_last, bool) or not isinstance(average_last, int)
                                         or average_last < 1 or checkpoint_dir is None):
            raise ConfigError(f"average_last is a number of epochs (an int >= 1) and needs a checkpoint_dir, got "
                              f"average_last={average_last!r}, checkpoint_dir={checkpoint_dir!r}")
        self.average_last = average_last
        self.rank, self.world_size = init_distributed(model)
        if progress not in (True, False, "epochs"):
            raise ValueError(f"progress is True, False or 'epochs', got {progress!r}")
        self.progress = progress is True and self.rank == 0
        self._epoch_lines = progress == "epochs" and self.rank == 0
        self._param_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            self._forward = DistributedDataParallel(
                LossOfModel(model, loss_fn), device_ids=[self._device] if self._device.type == "cuda" else None,
                **dict(ddp_options or {}))
        else:
            self._forward = lambda batch: loss_fn(model, batch)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.elapsed_seconds = 0.0
        self.budget_done = 0.0
        self._budget: tuple[int | None, int | None, float | None] = (None, None, None)
        self.history: list[dict[str, Any]] = []
        self._totals = _Totals()
        self._epoch_batches: int | None = None   # the epoch's number of batches, once known
        self._out_of_time = False
        self._updating = False                   # between the optimizer step and the position update
        self._clock = (time.perf_counter(), 0.0)

    @property
    def checkpoint_path(self) -> str | None:
        """``checkpoint_dir/last.safetensors``: everything a resume needs."""
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, LAST_CHECKPOINT)

    @property
    def best_path(self) -> str | None:
        """``checkpoint_dir/best.safetensors``: the model at its best evaluation (see `keep_best`)."""
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, BEST_FILE)

    @property
    def average_path(self) -> str | None:
        """``checkpoint_dir/average.safetensors``: the model averaged over the last epochs (see `average_last`)."""
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, AVERAGE_FILE)

    @property
    def model_path(self) -> str | None:
        """``checkpoint_dir/model.safetensors``: the model's parameters only, for ``looplift.load``."""
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, MODEL_FILE)

    def fit(self, make_batches: Callable[[int], Sequence[Any]], *, epochs: int | None = None,
            max_steps: int | None = None, time_budget: float | None = None,
            evaluate: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
            resume: bool = False) -> list[dict[str, Any]]:
        """Train until `epochs` epochs or `max_steps` steps are done or `time_budget` seconds are spent.

        All three count from the start of training, across resumes. Training
        stops after the first step that began with `time_budget` seconds of
        training (steps, evaluation, checkpoints) behind it. ``make_batches(epoch)``
        gives the epoch's batches (anything `loss_fn` takes); it must give the
        same list every time for the same epoch, and not use the global RNGs.

        ``evaluate(model)`` runs at the end of each epoch, and at the end of
        training if it stopped within an epoch, on every rank, in eval mode
        and under ``torch.no_grad()``; its results (rank 0's) are printed and
        stored in the history. It may use the RNGs: their states are restored
        after it.

        A checkpoint is written at the end of each epoch and when training
        stops within one (and, best effort, on KeyboardInterrupt). With
        `resume`, ``checkpoint_dir/last.safetensors`` is loaded first, if it
        exists (else training starts fresh, saying so): the model, optimizer,
        scheduler, RNG states and position are restored and training goes on
        with the same epoch's remaining batches, computing exactly what an
        uninterrupted run would have.

        Returns:
            The history: one dict per epoch with ``epoch``, ``complete``
            (False for an epoch stopped within), ``steps`` (the global step
            count at its end), ``epoch_steps``, ``train_loss`` (sum of losses
            / sum of counts), ``items`` (sum of counts), ``items_per_second``,
            ``seconds`` (of its steps), ``lr`` (of the first parameter group)
            and ``eval`` (the evaluation's results, or {}).

        Raises:
            ValueError: no stopping condition; no batches for an epoch (before
                any step of it); ranks with different numbers of batches; an
                epoch resumed within has a different number of batches now.
            CheckpointError: the checkpoint cannot be read or does not match
                the model, optimizer or scheduler (nothing is changed then),
                or a checkpoint cannot be written (the previous one is kept).
        """
        if epochs is None and max_steps is None and time_budget is None:
            raise ConfigError("fit needs epochs, max_steps or time_budget: otherwise training never ends")
        if not callable(make_batches):
            raise ArgumentError(f"fit: make_batches must be a function of the epoch returning its batches, got "
                                f"{type(make_batches).__name__}")
        for name, value in (("epochs", epochs), ("max_steps", max_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"fit: {name} must be a positive int (or None), got {value!r}")
        if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                        or not time_budget > 0):
            raise ConfigError(f"fit: time_budget must be a positive number of seconds (or None), got {time_budget!r}")
        if resume:
            self._resume()
        self._budget = (epochs, max_steps, time_budget)
        self._clock = (time.perf_counter(), self._agreed(self.elapsed_seconds))
        self._out_of_time = time_budget is not None and self._clock[1] >= time_budget
        self.model.train()
        try:
            while not self._done(epochs, max_steps):
                batches = list(make_batches(self.epoch))
                self._check_batches(batches)
                complete = self._run_epoch(batches, max_steps, time_budget)
                self._end_epoch(evaluate, complete)
                if not complete:
                    break
        except KeyboardInterrupt:
            self._save_after_interrupt()
            raise
        finally:
            self.elapsed_seconds = self._elapsed()
        return self.history

    # -- steps ------------------------------------------------------------------------------------

    def _done(self, epochs: int | None, max_steps: int | None) -> bool:
        return ((epochs is not None and self.epoch >= epochs)
                or (max_steps is not None and self.global_step >= max_steps) or self._out_of_time)

    def _check_batches(self, batches: list) -> None:
        if not batches:
            raise ValueError(f"no batches: the dataset is empty (make_batches({self.epoch}) returned no batches)")
        if self.world_size > 1:
            counts = torch.tensor([len(batches), -len(batches)], device=self._device)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            if counts[0] != -counts[1]:
                raise ValueError(f"the ranks have from {-int(counts[1])} to {int(counts[0])} batches for epoch "
                                 f"{self.epoch}: every rank must take the same number of steps (shard the data "
                                 f"with bucketed_batches(..., world_size=trainer.world_size, rank=trainer.rank))")
        if self._epoch_batches is not None and self._epoch_batches != len(batches):
            raise ValueError(f"training stopped at step {self.step_in_epoch} of epoch {self.epoch}, which had "
                             f"{self._epoch_batches} batches, but make_batches({self.epoch}) now gives "
                             f"{len(batches)}: the data changed, so training cannot go on where it stopped")
        self._epoch_batches = len(batches)

    def _run_epoch(self, batches: list, max_steps: int | None, time_budget: float | None) -> bool:
        """Run the epoch's remaining steps; True if the epoch was completed, False if training stopped within it."""
        with tqdm(total=len(batches), initial=self.step_in_epoch, desc=f"epoch {self.epoch}", unit="step",
                  file=sys.stderr, disable=not self.progress, leave=False, dynamic_ncols=True) as bar:
            for batch in batches[self.step_in_epoch:]:
                self._step(batch, time_budget)
                t = self._totals
                bar.set_postfix(step=self.global_step, loss=f"{t.loss_sum / max(t.count, 1e-30):.4f}",
                                items_s=f"{t.count / max(t.seconds, 1e-9):.0f}", refresh=False)
                bar.update()
                if self.step_in_epoch < len(batches) and self._done(None, max_steps):
                    return False
        return True

    def _step(self, batch: Any, time_budget: float | None) -> None:
        start = time.perf_counter()
        elapsed = self._elapsed()
        over_budget = time_budget is not None and elapsed >= time_budget
        self.optimizer.zero_grad(set_to_none=True)
        result = self._forward(batch)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ArgumentError(f"loss_fn must return a pair (loss_sum, count): the summed loss (a scalar tensor) "
                                f"and the number of items it sums over; got {type(result).__name__} "
                                f"{_short(result)}", where=_code_line(self.loss_fn))
        loss_sum, count = result
        if not isinstance(loss_sum, torch.Tensor) or loss_sum.ndim != 0:
            raise ArgumentError(f"loss_fn must return (loss_sum, count) with loss_sum a scalar tensor, got "
                                f"{_short(loss_sum)}", where=_code_line(self.loss_fn))
        # one all-reduce: the loss and count summed over ranks, whether any rank is out of time, and the time
        # (its mean over the ranks is the time `budget_done` reads: the same on every rank)
        stats = torch.cat([loss_sum.detach().to(torch.float64).reshape(1),
                           torch.as_tensor(count, dtype=torch.float64, device=loss_sum.device).reshape(1),
                           torch.tensor([float(over_budget), elapsed], dtype=torch.float64, device=loss_sum.device)])
        if self.world_size > 1:
            dist.all_reduce(stats)
        total = stats[1].to(loss_sum.dtype)
        loss = loss_sum / torch.where(total > 0, total, torch.ones_like(total))
        if self.world_size > 1:
            loss = loss * self.world_size   # DDP averages the ranks' gradients: this makes it their sum
        loss.backward()
        self._updating = True
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.clip_norm)
        self.optimizer.step()
        loss_total, count_total, out_of_time, elapsed_sum = stats.tolist()
        self.budget_done = self._budget_done(elapsed_sum / self.world_size)
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        self.step_in_epoch += 1
        self._totals.loss_sum += loss_total
        self._totals.count += count_total
        self._totals.seconds += time.perf_counter() - start
        self._totals.steps += 1
        self._out_of_time = out_of_time > 0
        self._updating = False

    def _budget_done(self, elapsed: float) -> float:
        """The fraction of the budget done after this step: of the time, the steps or the epochs, the most."""
        epochs, max_steps, time_budget = self._budget
        done = [0.0]
        if time_budget is not None:
            done.append(elapsed / time_budget)
        if max_steps is not None:
            done.append((self.global_step + 1) / max_steps)
        if epochs is not None and self._epoch_batches:
            done.append((self.epoch + (self.step_in_epoch + 1) / self._epoch_batches) / epochs)
        return min(1.0, max(done))

    def _elapsed(self) -> float:
        start, before = self._clock
        return before + time.perf_counter() - start

    def _agreed(self, value: float) -> float:
        """Rank 0's `value` on every rank (decisions taken from it must be the same everywhere)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device)
        dist.broadcast(t, 0)
        return float(t.item())

    # -- epochs, evaluation, history --------------------------------------------------------------

    def _end_epoch(self, evaluate: Callable | None, complete: bool) -> None:
        results = self._evaluate(evaluate) if evaluate is not None else {}
        self._keep_if_best(results)
        self._keep_average()
        t = self._totals
        entry = {"epoch": self.epoch, "complete": complete, "steps": self.global_step, "epoch_steps": t.steps,
                 "train_loss": t.loss_sum / t.count if t.count else math.nan, "items": t.count,
                 "items_per_second": t.count / t.seconds if t.seconds else 0.0, "seconds": t.seconds,
                 "lr": float(self.optimizer.param_groups[0]["lr"]), "eval": results}
        self.history = [h for h in self.history if h["epoch"] != self.epoch] + [entry]
        if self.progress or self._epoch_lines:
            shown = "".join(f", {k} {v:.4g}" for k, v in results.items())
            tqdm.write(f"epoch {self.epoch}{'' if complete else ' (stopped within)'}: step {self.global_step}, "
                       f"train loss {entry['train_loss']:.4f}, {entry['items_per_second']:.0f} items/s, "
                       f"{t.seconds:.1f} s{shown}", file=sys.stderr)
        if complete:
            self.epoch += 1
            self.step_in_epoch = 0
            self._totals = _Totals()
            self._epoch_batches = None
        self._save()

    def best(self) -> tuple[float, int, int] | None:
        """The lowest value of the `keep_best` result so far, with its epoch and global step (None before any)."""
        found = [(h["eval"][self.keep_best], h["epoch"], h["steps"]) for h in self.history
                 if self.keep_best is not None and self.keep_best in h.get("eval", {})]
        return min(found, key=lambda f: f[0]) if found else None

    def _keep_if_best(self, results: Mapping[str, float]) -> None:
        if self.keep_best is None:
            return
        if self.keep_best not in results:
            raise ConfigError(f"keep_best={self.keep_best!r}: the evaluation gave no such result, only "
                              f"{sorted(results)}")
        value, before = results[self.keep_best], self.best()
        if math.isnan(value) or before is not None and not value < before[0]:
            return
        if self.rank == 0:
            tensors = cpu_state(self.model)
            best = {"result": self.keep_best, "value": value, "epoch": self.epoch, "step": self.global_step}
            try:
                atomic_write(self.best_path, _save_bytes(tensors, metadata={**self.metadata,
                                                                            "best": json.dumps(best)}))
            except OSError as e:
                raise CheckpointError(f"cannot write {self.best_path!r} (the previous one is kept): "
                                      f"{type(e).__name__}: {e}") from e

    def _keep_average(self) -> None:
        """With `average_last`: keep the model at this epoch's end, and write the mean of the last ones."""
        if self.average_last is None or self.rank != 0:
            return
        folder = os.path.join(self.checkpoint_dir, EPOCHS_DIR)
        first = self.epoch - self.average_last + 1
        tensors = cpu_state(self.model)
        try:
            atomic_write(os.path.join(folder, f"epoch-{self.epoch}.safetensors"), _save_bytes(tensors))
            kept = []
            for name in os.listdir(folder):
                epoch = _epoch_of(name)
                if epoch is None:
                    continue
                if epoch < first or epoch > self.epoch:   # (older, or left by a run before a resume from earlier)
                    os.remove(os.path.join(folder, name))
                else:
                    kept.append(epoch)
            kept.sort()
            total = {k: v.double() for k, v in tensors.items() if v.is_floating_point()}
            for epoch in kept:
                if epoch != self.epoch:
                    earlier, _ = read_file(os.path.join(folder, f"epoch-{epoch}.safetensors"))
                    for k in total:
                        total[k] += earlier[k].double()
            mean = {k: (total[k] / len(kept)).to(v.dtype) if k in total else v for k, v in tensors.items()}
            atomic_write(self.average_path, _save_bytes(mean, metadata={**self.metadata,
                                                                       "average": json.dumps({"epochs": kept})}))
        except OSError as e:
            raise CheckpointError(f"cannot write the average model in {self.checkpoint_dir!r}: "
                                  f"{type(e).__name__}: {e}") from e

    def _evaluate(self, evaluate: Callable) -> dict[str, float]:
        rng = rng_state()
        self.model.eval()
        try:
            with torch.no_grad():
                results = evaluate(self.model)
        finally:
            self.model.train()
            set_rng_state(rng)
        return {str(k): float(v) for k, v in results.items()}

    # -- checkpoints ------------------------------------------------------------------------------

    def _save(self, *, collective: bool = True) -> None:
        """Write ``last.safetensors`` and ``model.safetensors`` (rank 0; the others wait)."""
        if self.checkpoint_dir is None:
            return
        self.elapsed_seconds = self._elapsed()
        rng = {self.rank: rng_state()}
        if collective and self.world_size > 1:
            states: list = [None] * self.world_size
            dist.all_gather_object(states, rng[self.rank])
            rng = dict(enumerate(states))
        if self.rank == 0:
            model_tensors = cpu_state(self.model)
            try:
                atomic_write(self.checkpoint_path, self._checkpoint_bytes(dict(model_tensors), rng))
                atomic_write(self.model_path, _save_bytes(model_tensors, metadata=self.metadata or None))
            except OSError as e:
                raise CheckpointError(f"cannot write the checkpoint in {self.checkpoint_dir!r} (the previous one "
                                      f"is kept): {type(e).__name__}: {e}") from e
        if collective and self.world_size > 1:
            dist.barrier()

    def _checkpoint_bytes(self, tensors: dict[str, torch.Tensor], rng: dict[int, dict]) -> bytes:
        clashing = [name for name in tensors if name.startswith(PREFIX)]
        if clashing:
            raise CheckpointError(f"model entries named {clashing!r} clash with the trainer's {PREFIX!r} entries")
        position = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                    "elapsed_seconds": self.elapsed_seconds, "epoch_batches": self._epoch_batches,
                    "totals": asdict(self._totals), "world_size": self.world_size}
        optimizer = {"class": class_name(self.optimizer), "param_names": self._param_names,
                     "state": encode(self.optimizer.state_dict(), f"{PREFIX}optimizer", tensors)}
        scheduler = None if self.scheduler is None else {
            "class": class_name(self.scheduler),
            "state": encode(self.scheduler.state_dict(), f"{PREFIX}scheduler", tensors)}
        metadata = {**self.metadata, f"{PREFIX}format": FORMAT, f"{PREFIX}position": json.dumps(position),
                    f"{PREFIX}optimizer": json.dumps(optimizer), f"{PREFIX}scheduler": json.dumps(scheduler),
                    f"{PREFIX}rng": json.dumps(encode(rng, f"{PREFIX}rng", tensors)),
                    f"{PREFIX}history": json.dumps(self.history)}
        return _save_bytes(tensors, metadata=metadata)

    def _save_after_interrupt(self) -> None:
        if self.checkpoint_dir is None:
            return
        if self._updating:
            _note(self.rank, "interrupted while updating the parameters: the last checkpoint is kept")
            return
        try:   # no collectives: the other ranks may be anywhere; only rank 0 writes, with its own RNG state
            self._save(collective=False)
        except Exception as e:  # best effort: the interrupt is what the user must see
            _note(self.rank, f"interrupted; the checkpoint could not be written: {type(e).__name__}: {e}")
        else:
            _note(self.rank, f"interrupted; saved {self.checkpoint_path} at step {self.global_step}")

    def _resume(self) -> None:
        path = self.checkpoint_path
        if path is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        exists = os.path.exists(path)
        if self.world_size > 1:
            found = torch.tensor([int(exists)], device=self._device)
            dist.all_reduce(found)
            if int(found) not in (0, self.world_size):
                raise CheckpointError(f"{path!r} exists for {int(found)} of {self.world_size} ranks: the "
                                      f"checkpoint directory must be shared by all ranks")
        if not exists:
            _note(self.rank, f"no checkpoint at {path!r}: starting fresh")
            return
        restored, error = None, None
        try:
            restored = self._read_checkpoint(path)
        except CheckpointError as e:
            error = e
        if self.world_size > 1:
            failed = torch.tensor([int(error is not None)], device=self._device)
            dist.all_reduce(failed)
            if failed and error is None:
                error = CheckpointError(f"another rank could not load {path!r}; nothing was changed")
        if error is not None:
            raise error
        self._restore(restored)
        _note(self.rank, f"resumed from {path!r}: epoch {self.epoch}, step {self.step_in_epoch} of it, "
                         f"global step {self.global_step}")

    def _read_checkpoint(self, path: str) -> dict[str, Any]:
        """Everything in the checkpoint at `path`, checked against this trainer; nothing is changed yet."""
        tensors, metadata = read_file(path)
        if metadata.get(f"{PREFIX}format") != FORMAT:
            raise CheckpointError(f"{path!r} is not a training checkpoint (it has no trainer state); a model-only "
                                  f"file loads with looplift.load or looplift.train.load_model")
        try:
            position = json.loads(metadata[f"{PREFIX}position"])
            optimizer = json.loads(metadata[f"{PREFIX}optimizer"])
            scheduler = json.loads(metadata[f"{PREFIX}scheduler"])
            rng = decode(json.loads(metadata[f"{PREFIX}rng"]), tensors)
            history = json.loads(metadata[f"{PREFIX}history"])
            optimizer_state = decode(optimizer["state"], tensors)
            scheduler_state = None if scheduler is None else decode(scheduler["state"], tensors)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"the checkpoint {path!r} is damaged: {type(e).__name__}: {e}") from e
        problems = mismatches(self.model, {k: v for k, v in tensors.items() if not k.startswith(PREFIX)})
        if optimizer["class"] != class_name(self.optimizer):
            problems.append(f"optimizer: the checkpoint's is {optimizer['class']}, this one is "
                            f"{class_name(self.optimizer)}")
        elif optimizer["param_names"] != self._param_names:
            problems.append(f"optimizer: the checkpoint's parameter groups hold {optimizer['param_names']}, "
                            f"this one's {self._param_names}")
        mine = None if self.scheduler is None else class_name(self.scheduler)
        theirs = None if scheduler is None else scheduler["class"]
        if mine != theirs:
            problems.append(f"scheduler: the checkpoint's is {theirs}, this one is {mine}")
        if problems:
            raise CheckpointError(f"the checkpoint {path!r} does not match this training run ({len(problems)} "
                                  f"problems; nothing was changed):\n  " + "\n  ".join(problems))
        return {"model": tensors, "optimizer": optimizer_state, "scheduler": scheduler_state,
                "rng": rng.get(self.rank), "position": position, "history": history}

    def _restore(self, restored: dict[str, Any]) -> None:
        try:  # first what could still fail, so that a failure changes nothing
            self.optimizer.load_state_dict(restored["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"cannot restore the optimizer state: {type(e).__name__}: {e}") from e
        if self.scheduler is not None:
            self.scheduler.load_state_dict(restored["scheduler"])
        copy_into(self.model, restored["model"])
        position = restored["position"]
        if restored["rng"] is not None:
            set_rng_state(restored["rng"])
        if restored["rng"] is None:
            _note(self.rank, f"the checkpoint has no RNG state for rank {self.rank} (it was written after an "
                             f"interrupt, or by fewer ranks): random numbers will differ from an uninterrupted run")
        elif position["world_size"] != self.world_size:
            _note(self.rank, f"the checkpoint was written by {position['world_size']} ranks, this run has "
                             f"{self.world_size}: steps compute the same up to rounding and random numbers")
        self.epoch = position["epoch"]
        self.step_in_epoch = position["step_in_epoch"]
        self.global_step = position["global_step"]
        self.elapsed_seconds = position["elapsed_seconds"]
        self._epoch_batches = position["epoch_batches"] if self.step_in_epoch else None
        self._totals = _Totals(**position["totals"])
        self.history = restored["history"]



def _epoch_of(name: str) -> int | None:
    """The epoch of a file ``epoch-<n>.safetensors`` kept for `average_last` (None: another file)."""
    stem = name.removeprefix("epoch-").removesuffix(".safetensors")
    return int(stem) if name.startswith("epoch-") and name.endswith(".safetensors") and stem.isdigit() else None


def _note(rank: int, message: str) -> None:
    if rank == 0:
        print(message, file=sys.stderr)


entry_methods(Trainer, "__init__", "fit", public="looplift.train.Trainer")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _code_line(fn) -> str:
    """``file:line`` where the function `fn` is defined (the user's loss function), or "" if unknown."""
    code = getattr(fn, "__code__", None) or getattr(getattr(type(fn), "forward", None), "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else ""
