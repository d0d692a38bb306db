"""Hugging Face ``Trainer`` integration: either kind of disttrain method inside an unmodified Trainer.

    trainer = Trainer(model=model, args=args, train_dataset=train)
    exchange = compress_gradients(trainer)   # the local-step default, diloco-sparse-k4-h5
    trainer.train()                          # under torchrun --nproc-per-node N
    exchange.exchanges, exchange.bytes_sent, exchange.dense_bytes

Why a DDP comm hook. Under torchrun, Trainer (transformers 5.x) hands the model to
``accelerate``'s ``prepare``, which wraps it in torch DDP (``trainer.model_wrapped``), and DDP
all-reduces every gradient during backward. Trainer has no public switch to skip that wrap, and
an exchange done in the optimizer step would come after Trainer has clipped the gradients, so
the clip would see local gradients instead of the average. So ``DisttrainCallback`` registers a
comm hook on the DDP model that Trainer built, at ``on_train_begin``, before the first backward.
Everything else stays Trainer's: ``no_sync`` while gradients accumulate, clipping, the optimizer
and the schedule. Hence only methods whose optimizer is AdamW run here, or its lean version (the
``*-lean`` methods: ``compress_gradients`` gives Trainer a ``disttrain.optim.LeanAdamW`` with
Trainer's own hyper-parameters and weight-decay groups, which Trainer then uses instead of
building AdamW):

- per-step methods (``*-reconstruct``, ``power-*``, ``ddp-hook``, ``dense``): ``disttrain_hook``
  sends each DDP bucket as one collective of compressed payload instead of DDP's dense
  all-reduce, once per optimizer step, and Trainer's optimizer applies the rebuilt average.
- local-step methods (``diloco-*``, ``fedavg-h10``, ``fedavg-seeded-int8-h10``): the hook is
  torch's ``noop_hook``, so each inner step is Trainer's optimizer step on this worker's own
  gradient (DDP does not divide it by the world size when a hook is registered) and sends
  nothing. After every H-th optimizer step (``state.global_step % H == 0``) ``OuterStep``
  exchanges the round's compressed pseudo-gradient and moves every replica to the same weights.
  A shorter last round is exchanged at the last step (or at ``on_train_end`` if training stopped
  early), so the replicas always end identical. Between round ends each worker's weights are its
  own: an evaluation there scores each worker's own, a checkpoint holds rank 0's.

Membership is static. Elastic membership (workers that leave and join mid-run) is not offered
inside Trainer: Trainer owns the loop, the data loader and the process group, so nothing outside
it can drop a member, reshard the data or rebuild the group, and a member that dies fails
Trainer's own collectives (DDP's, the loss gathering for logs) on every other worker. Use
``disttrain train`` or ``disttrain.Session`` for that.

Trainer checkpoints hold neither the per-step hook's error-feedback residuals and bases nor a
round's start and outer momentum: a resumed run starts them afresh, the same way on every worker.

Two traps, both of plain Trainer: on CPU, accelerate sees the torchrun job only with
``TrainingArguments(use_cpu=True)``; and ``trainer.evaluate()`` before ``trainer.train()`` leaves
the model unwrapped for good (accelerate keeps the model it prepared for evaluation), so no
gradient would be exchanged at all: the callback stops with that explanation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

from disttrain.comm.ddp_hook import DisttrainHookState, disttrain_hook
from disttrain.methods import DEFAULT_METHOD, METHODS, Method, get_method
from disttrain.models.pretrained import INSTALL
from disttrain.optim.lean_adamw import LeanAdamW
from disttrain.train.outer import OuterStep

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:
    raise ImportError(f"disttrain.integrations.hf needs transformers; install it with: {INSTALL}") from error

log = logging.getLogger(__name__)


def runs_in_trainer(method: Method) -> bool:
    """Whether Trainer's AdamW (or a LeanAdamW given to it) can apply the method: a per-step exchange or
    local-step rounds (not overlapped ones)."""
    traits = method.traits
    return traits.user_optimizer and traits.compresses and not traits.overlaps and method.optimizer in ("adamw", "lean_adamw")


def give_lean_adamw(trainer: Trainer, method: Method) -> None:
    """Make Trainer step with LeanAdamW (Trainer builds its AdamW only when it has no optimizer yet)."""
    if isinstance(trainer.optimizer, LeanAdamW):
        return
    if trainer.optimizer is not None:
        raise ValueError(
            f"method {method.name!r} keeps Adam's moments lean: give Trainer no optimizer (it is then given a "
            f"disttrain.optim.LeanAdamW), or a LeanAdamW, not a {type(trainer.optimizer).__name__}"
        )
    args, model = trainer.args, trainer.model
    decayed = set(trainer.get_decay_parameter_names(model))
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trained if name in decayed], "weight_decay": args.weight_decay},
        {"params": [p for name, p in trained if name not in decayed], "weight_decay": 0.0},
    ]
    trainer.optimizer = LeanAdamW(
        [group for group in groups if group["params"]], lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


class DisttrainCallback(TrainerCallback):
    """What ``compress_gradients`` returns, for either kind of method.

    ``exchanges`` (one per optimizer step, or one per round), ``bytes_sent`` (payload bytes this
    worker put into them) and ``dense_bytes`` (what DDP's dense fp32 all-reduce would have sent
    for the same optimizer steps), all cumulative; every Trainer log line gains the last two.
    """

    def __init__(self, trainer: Trainer, method: Method):
        self.trainer = trainer
        self.method = method
        self.hook_state: DisttrainHookState | None = None  # per-step methods
        self.outer: OuterStep | None = None  # local-step methods
        self.steps = 0  # optimizer steps taken under DDP
        self._round_bytes = 0
        self._round_open = False
        self._inner_lr = 0.0
        self._dense_bytes_per_step = 0
        self._ddp: DistributedDataParallel | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        wrapped = self.trainer.model_wrapped
        if wrapped is self._ddp:  # train() again: the hook is already in place
            return
        if not isinstance(wrapped, DistributedDataParallel):
            if dist.is_initialized() and dist.get_world_size() > 1:
                raise RuntimeError(
                    f"Trainer did not wrap the model in torch DDP (it is a {type(wrapped).__name__}), so no "
                    "gradients would be exchanged. trainer.evaluate() before trainer.train() does this (accelerate "
                    "keeps the model it prepared for evaluation): use TrainingArguments(eval_on_start=True) "
                    "instead. FSDP and DeepSpeed are not supported."
                )
            log.info("one process: nothing to exchange")
            return
        params = [p for p in wrapped.module.parameters() if p.requires_grad]
        if self.method.traits.rounds:
            self.outer = OuterStep(params, self.method, args.seed, args.learning_rate, wrapped.process_group)
            wrapped.register_comm_hook(None, noop_hook)
        else:
            self.hook_state = DisttrainHookState(params, self.method.compression, args.seed, wrapped.process_group)
            wrapped.register_comm_hook(self.hook_state, disttrain_hook)
        self._dense_bytes_per_step = sum(4 * p.numel() for p in params)
        self._ddp = wrapped
        log.info("exchanging as disttrain method %r does", self.method.name)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The lr this step used: the scheduler moves it before on_step_end.
        self._inner_lr = self.trainer.optimizer.param_groups[0]["lr"]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._ddp is None:
            return
        self.steps += 1
        if self.outer is None:
            return
        self._round_open = True
        # The last step ends a round too, so that its evaluation and checkpoint see one model.
        if state.global_step % self.method.local_steps == 0 or state.global_step >= state.max_steps:
            self._end_round()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A run stopped early (a callback's should_training_stop) may end inside a round.
        if self.outer is not None and self._round_open:
            self._end_round()

    def _end_round(self) -> None:
        """The round's compressed pseudo-gradient exchange and outer step: every replica the same again."""
        assert self.outer is not None
        self.outer.apply(self._inner_lr)
        self._round_bytes += self.outer.reducer.payload_bytes_last_step
        self._round_open = False

    @property
    def exchanges(self) -> int:
        """Exchanges so far: one per optimizer step for a per-step method, one per round for a local-step one."""
        if self.outer is not None:
            return self.outer.rounds
        return 0 if self.hook_state is None else self.hook_state.step

    @property
    def bytes_sent(self) -> int:
        """Bytes this worker put into collectives: payloads, scales, basis broadcasts."""
        if self.outer is not None:
            return self._round_bytes
        return 0 if self.hook_state is None else self.hook_state.payload_bytes

    @property
    def dense_bytes(self) -> int:
        """What DDP's dense fp32 all-reduce would have put in for the same optimizer steps."""
        return self.steps * self._dense_bytes_per_step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self._ddp is None or logs is None:
            return
        counts = {"bytes_sent": self.bytes_sent, "dense_bytes": self.dense_bytes}
        logs.update(counts)
        state.log_history[-1].update(counts)


def compress_gradients(trainer: Trainer, method: str = DEFAULT_METHOD) -> DisttrainCallback:
    """Make ``trainer`` exchange as disttrain ``method`` does (seeded by ``trainer.args.seed``);
    returns the callback, which counts the exchanges and bytes."""
    chosen = get_method(method)
    if not runs_in_trainer(chosen):
        usable = ", ".join(name for name, m in METHODS.items() if runs_in_trainer(m))
        raise ValueError(
            f"method {method!r} does not run inside Trainer, which keeps its own AdamW (or a LeanAdamW) and takes either one "
            f"exchanged gradient per step or local steps with round-end exchanges; choose one of: {usable}"
        )
    if chosen.optimizer == "lean_adamw":
        give_lean_adamw(trainer, chosen)
    callback = DisttrainCallback(trainer, chosen)
    # First in line, so that the byte counts it adds to a log reach the printers and reporters.
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
