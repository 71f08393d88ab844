"""The training loop: one function for one process or many (torchrun), every modality, the EBT
or its baseline. The modality (modalities/) supplies the data, the task and any assets.

A run directory holds config.json, metrics.jsonl, tokenizer/ (text) and step_NNNNNN/
checkpoints.
Starting `train` on a run directory that already has a checkpoint resumes it exactly: model,
optimizer, scheduler, RNG streams, data position and replay buffer are all restored.

Under torchrun every rank reads its own shard of each batch; the RNG streams and the replay
buffer are per rank and are gathered into rank 0's checkpoint, so a distributed run resumes
exactly on the same number of processes (and approximately on another number).

A run directory has one owner (rundir.RunLock, held by rank 0 for the whole job). A resumed
run may change only rundir.RESUMABLE_KEYS; those changes are applied to the restored optimizer
and scheduler and recorded as a `resume` row. SIGINT / SIGTERM save a checkpoint at the current
step and stop (interrupt.py).
"""

from __future__ import annotations

import json
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ebt import checkpoint
from ebt.config import Config, ConfigError
from ebt.data import iter_eval_batches
from ebt.errors import MachineError
from ebt.modalities import modality_for
from ebt.models import build_model
from ebt.training.distributed import (
    DistributedContext,
    barrier,
    full_model_state,
    full_optimizer_state,
    gather_to_main,
    gathered,
    is_sharded,
    load_full_model_state,
    load_optimizer_state,
    main_first,
    mean_over_ranks,
    on_main,
    setup,
    teardown,
    wrap_objective,
)
from ebt.training.evaluate import evaluate
from ebt.training.interrupt import FAILED, StopRequest, TrainingInterrupted
from ebt.training.objective import Objective
from ebt.training.optim import apply_hyperparameters, build_optimizer, build_scheduler, lr_report
from ebt.training.replay import ReplayBuffer
from ebt.training.rundir import (
    check_resumable,
    check_space,
    config_changes,
    intact_note,
    own_run,
    resume_row,
    write_runtime,
)
from ebt.training.step import TrainingStep, prepare_model
from ebt.training.tracking import MetricsLogger, format_row, truncate_metrics


class Trainer:
    """Holds everything one training run needs; `run()` trains to train.max_steps."""

    def __init__(self, config: Config, context: DistributedContext) -> None:
        self.config, self.context = config, context
        self.run_dir = Path(config.train.out_dir)
        self.log_failure: MachineError | None = None  # rank 0's, see log()
        torch.manual_seed(config.train.seed)  # the same initial weights on every rank
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        self.modality = modality_for(config)
        with main_first():  # rank 0 builds the token caches, the others then read them
            self.train_data = self.modality.dataset("train")
            self.val_data = self.modality.dataset("val")
        vocab_size = getattr(self.modality, "vocab_size", 0)
        self.model = build_model(config, vocab_size).to(context.device)
        if config.train.compile and context.enabled and config.train.parallel == "fsdp":
            raise ValueError("train.compile does not support train.parallel=fsdp; use ddp")
        prepare_model(self.model, config.train, context.device)
        if context.enabled:  # per-rank noise: initial candidates, Langevin, step sizes, replay
            torch.manual_seed(config.train.seed + context.rank)
        self.objective = Objective(self.model, config.think, task=self.modality.task("train"))
        self.objective.activation_checkpointing = config.train.activation_checkpointing
        self.wrapped = wrap_objective(self.objective, context, config.train.parallel)
        self.optimizer = build_optimizer(self.model, config.train, config.think)
        self.scheduler = build_scheduler(self.optimizer, config.train)
        wrapped = self.wrapped if context.enabled else None
        self.stepper = TrainingStep(
            self.objective, self.optimizer, config.train, context.device, wrapped
        )
        self.batches = self.modality.batches(
            self.train_data,
            seed=config.train.seed,
            rank=context.rank,
            world_size=context.world_size,
        )
        self.replay = self._replay_buffer()
        self.step = 0

    def _replay_buffer(self) -> ReplayBuffer | None:
        think = self.config.think
        if not think.replay_buffer or self.config.model.kind != "ebt":
            return None
        sample = int(self.config.train.batch_size * think.replay_fraction)
        return ReplayBuffer(think.replay_buffer_size, sample)

    def resume_if_possible(self) -> dict[str, list[Any]] | None:
        """Restore the newest checkpoint in the run directory, if there is one, and apply the
        config's resumable changes to it; returns those changes (None: nothing to resume)."""
        if not self.run_dir.is_dir() or checkpoint.latest_checkpoint(self.run_dir) is None:
            return None
        device = str(self.context.device)  # the newest checkpoint that loads, with a warning
        loaded = checkpoint.load_newest_valid(self.run_dir, with_train_state=True, device=device)
        changes = config_changes(loaded.config, self.config.to_dict())
        check_resumable(self.run_dir, changes)
        if is_sharded(self.model):
            load_full_model_state(self.model, loaded.model_state)
        else:
            self.model.load_state_dict(loaded.model_state)
        train_state = loaded.train_state
        load_optimizer_state(self.model, self.optimizer, train_state["optimizer"])
        self.scheduler.load_state_dict(train_state["scheduler"])
        train, think = self.config.train, self.config.think
        apply_hyperparameters(self.model, self.optimizer, self.scheduler, train, think)
        self._restore_rank_state(train_state)
        self.step = train_state["step"]
        if train.max_steps < self.step:
            raise ConfigError(
                f"train.max_steps={train.max_steps} is below the step {self.step} that "
                f"{self.run_dir} has reached; raise it to train on, or train into a new out_dir"
            )
        return changes

    def _restore_rank_state(self, train_state: dict[str, Any]) -> None:
        """This rank's data position, replay buffer and RNG streams from a checkpoint."""
        extra, rank, world = train_state["extra"], self.context.rank, self.context.world_size
        ranks = extra.get("ranks") or [{"rng": train_state["rng"], "replay": extra.get("replay")}]
        data, saved_world = dict(extra["data"]), int(extra.get("world_size", len(ranks)))
        if saved_world != world:  # keep the global position in the epoch; not an exact resume
            data["position"] = data["position"] * saved_world // world
            if self.context.is_main:
                warnings.warn(
                    f"resuming a {saved_world}-process run on {world} processes: data order, "
                    "random streams and replay buffers continue approximately, not exactly",
                    stacklevel=2,
                )
        self.batches.load_state_dict(data)
        if rank >= len(ranks):  # a rank the checkpoint did not have: fresh streams and buffer
            return
        if self.replay is not None:
            self.replay.load_state_dict(ranks[rank].get("replay") or {})
        checkpoint.restore_rng({"rng": ranks[rank]["rng"]})

    def _micro_step(self, scale: float, sync: bool = True) -> dict[str, torch.Tensor]:
        fresh = next(self.batches).to(self.context.device)  # (B, S + 1)
        batch, replay_states = fresh, None
        if self.replay is not None:
            batch, replay_states = self.replay.extend_batch(fresh)
        output = self.stepper.forward_backward(batch, replay_states, scale, sync)
        if self.replay is not None:
            self.replay.update(fresh, output.final_state[: fresh.shape[0]])
        return output.metrics

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (with gradient accumulation); returns the logged row."""
        accumulation = self.config.train.grad_accum
        rows = [
            self._micro_step(1.0 / accumulation, sync=index == accumulation - 1)
            for index in range(accumulation)
        ]
        norm = self.stepper.optimizer_step(self.scheduler)
        self.step += 1
        means = {
            key: sum(r[key].item() for r in rows) / accumulation
            for key in ("loss", "initial_loss", "final_step_loss", "energy_gap", "step_size")
            if key in rows[0]
        }  # this rank's; logged as the mean over ranks
        row = {"step": self.step, "grad_norm": norm.item()}
        return row | mean_over_ranks(means, self.context.device) | lr_report(self.optimizer)

    def evaluate_split(self, name: str = "val") -> dict[str, Any]:
        train = self.config.train
        batches = iter_eval_batches(
            self.val_data,
            train.batch_size,
            train.eval_batches,
            rank=self.context.rank,
            world_size=self.context.world_size,
        )
        with gathered(self.objective):  # FSDP: one all-gather, then collective-free batches
            metrics = evaluate(
                self.objective,
                batches,
                self.context.device,
                seed=train.seed,
                progress=train.progress and self.context.is_main,  # a long eval shows
            )
        return {"step": self.step, "split": name} | metrics

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: RNG streams and the replay buffer (CPU tensors)."""
        state: dict[str, Any] = {"rng": checkpoint.rng_state()}
        if self.replay is not None:
            state["replay"] = {k: v.cpu() for k, v in self.replay.state_dict().items()}
        return state

    def save(self) -> None:
        """Write a checkpoint from rank 0; every rank must call this (it gathers)."""
        extra: dict[str, Any] = {
            "data": self.batches.state_dict(),
            "world_size": self.context.world_size,
        }
        if self.context.enabled:
            extra["ranks"] = gather_to_main(self._rank_state())
        elif self.replay is not None:
            extra["replay"] = self.replay.state_dict()
        model, optimizer = self.model, self.optimizer
        if is_sharded(self.model):  # full state dicts, gathered onto rank 0's CPU
            model = full_model_state(self.model)
            optimizer = full_optimizer_state(self.model, self.optimizer)
        on_main(lambda: self._write_checkpoint(model, optimizer, extra))  # every rank: 1 line
        barrier()

    def _write_checkpoint(self, model: Any, optimizer: Any, extra: dict[str, Any]) -> None:
        """Rank 0: check the free space, then write the checkpoint; a machine fault is one
        line naming the newest complete checkpoint and the command that resumes from it."""
        check_space(self.run_dir, self.step)
        try:
            checkpoint.save_checkpoint(
                self.run_dir,
                self.step,
                model,
                self.config.to_dict(),
                optimizer,
                self.scheduler,
                extra=extra,
                keep=self.config.train.keep_checkpoints,
            )
        except MachineError as error:
            raise MachineError(f"{error}; {intact_note(self.run_dir)}") from error

    def log(self, logger: MetricsLogger, row: dict[str, Any]) -> dict[str, Any]:
        """logger.log; a full disk there is one line naming the intact checkpoint. Under
        torchrun rank 0 holds it until the ranks next agree (the end of the step: FAILED), so
        that no rank waits for one that stopped; the log is closed, the run goes on to there."""
        try:
            return logger.log(row)
        except MachineError as error:
            failure = MachineError(f"{error}; {intact_note(self.run_dir)}")
            if not self.context.enabled:
                raise failure from error
            self.log_failure = self.log_failure or failure
            return logger.log(row)  # closed: only converts the row

    def _raise_log_failure(self) -> None:
        if self.log_failure is not None:
            raise self.log_failure

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _stop(self, logger: MetricsLogger, signal_number: int) -> None:
        """Save at the current step, record the interruption, raise TrainingInterrupted."""
        name = signal.Signals(signal_number).name
        self.log(logger, {"event": "interrupted", "step": self.step, "signal": name})
        self.save()
        saved = self.run_dir / checkpoint.step_dir_name(self.step)
        message = f"{name} at step {self.step}: saved {saved}; run the same command to resume"
        raise TrainingInterrupted(message, signal_number)

    def run(self, logger: MetricsLogger) -> dict[str, Any]:
        """Train to max_steps, logging, evaluating and checkpointing on schedule; on SIGINT or
        SIGTERM save at the current step and raise TrainingInterrupted."""
        train = self.config.train
        show = train.progress and self.context.is_main
        bar = tqdm(total=train.max_steps, initial=self.step, disable=not show, desc="train")
        started, last_eval = time.perf_counter(), {}
        if train.compile and show and self.step < train.max_steps:
            message = "train.compile: the first step compiles the training passes (about a minute"
            message += " on CPU the first time; inductor caches the kernels for later runs)"
            bar.write(message, file=sys.stderr)
        with StopRequest() as stop:
            while self.step < train.max_steps:
                row = self.train_step()
                bar.update(1)
                if self._due(train.log_every) or self.step == train.max_steps:
                    row["elapsed_s"] = time.perf_counter() - started
                    self.log(logger, row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                if self._due(train.eval_every):
                    last_eval = self.log(logger, self.evaluate_split())
                    bar.write(format_row(last_eval), file=sys.stderr) if show else None
                if self._due(train.save_every):
                    self.save()
                signal_number = stop.signal(self.context.device, self.log_failure is not None)
                if signal_number:
                    bar.close()
                    if signal_number == FAILED:
                        on_main(self._raise_log_failure)  # rank 0's line on every rank
                    self._stop(logger, signal_number)
        bar.close()
        if not last_eval or last_eval.get("step") != self.step:
            last_eval = self.log(logger, self.evaluate_split())
        on_main(self._raise_log_failure)  # every rank stops when rank 0's log failed
        self.save()
        return last_eval


def train(config: Config) -> dict[str, Any]:
    """Train (or resume) the run config.train.out_dir; returns the final evaluation row.

    Under torchrun (WORLD_SIZE > 1) this joins the process group (and leaves it at the end if
    it created it); every rank returns the same evaluation row.
    """
    context = setup(config.train.device)
    try:
        return _train(config, context)
    finally:
        if context.owns_group:
            teardown()


def _train(config: Config, context: DistributedContext) -> dict[str, Any]:
    run_dir = Path(config.train.out_dir)
    with own_run(run_dir, context):
        _check_resumable_early(config, run_dir)
        trainer = Trainer(config, context)
        changes = trainer.resume_if_possible()
        on_main(lambda: _prepare(trainer, changes is not None))  # every rank stops if it fails
        barrier()
        with _open_logger(config) as logger:
            if changes is not None:
                trainer.log(logger, resume_row(trainer.step, changes))
            return trainer.run(logger)


def _open_logger(config: Config) -> MetricsLogger:
    """The metrics log, opened by rank 0 (a closed one elsewhere): a fault opening it (a
    read-only file, a missing tracker) stops every rank with rank 0's line."""
    train, opened = config.train, []
    options = {"tensorboard": train.tensorboard, "wandb": train.wandb}
    options["wandb_project"] = train.wandb_project
    on_main(lambda: opened.append(MetricsLogger(train.out_dir, config.to_dict(), **options)))
    return opened[0] if opened else MetricsLogger(train.out_dir, enabled=False)


def _prepare(trainer: Trainer, resumed: bool) -> None:
    """Rank 0, before the first step: the run's config and assets; a resumed log cut back."""
    run_dir = trainer.run_dir
    checkpoint.remove_stale_temporaries(run_dir)
    checkpoint.write_run_config(run_dir, trainer.config.to_dict())
    write_runtime(run_dir, trainer.stepper.record())  # the resolved precision
    trainer.modality.save_assets(run_dir)
    if resumed:
        truncate_metrics(run_dir, trainer.step)


def _check_resumable_early(config: Config, run_dir: Path) -> None:
    """Refuse fixed-key changes before any data is built (Trainer.resume_if_possible checks
    again against the checkpoint it actually restores)."""
    step_dir = checkpoint.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if step_dir is None:
        return
    try:
        saved = json.loads((step_dir / checkpoint.CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable: the checkpoint loader reports it or falls back
    check_resumable(run_dir, config_changes(saved, config.to_dict()))
