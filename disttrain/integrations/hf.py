"""Hugging Face ``Trainer`` integration: gradients cross the network compressed, exactly once.

    trainer = Trainer(model=model, args=args, train_dataset=train)
    exchange = compress_gradients(trainer, "power-int4-r16")
    trainer.train()                      # under torchrun --nproc-per-node N
    exchange.bytes_sent, exchange.dense_bytes

Why a DDP comm hook. Under torchrun, Trainer (transformers 5.x) hands the model to
``accelerate``'s ``prepare``, which wraps it in torch DDP (``trainer.model_wrapped``), and DDP
all-reduces every gradient during backward. Trainer has no public switch to skip that wrap, and
an exchange done in the optimizer step would come after Trainer has clipped the gradients, so
the clip would see local gradients instead of the average. So ``DisttrainCallback`` registers
disttrain's ``disttrain_hook`` on the DDP model that Trainer built, at ``on_train_begin``, before
the first backward: each DDP bucket then travels as one collective of compressed payload
instead of DDP's dense all-reduce. Everything else stays Trainer's: ``no_sync`` while
gradients accumulate (one exchange per optimizer step), clipping of the averaged gradient, the
optimizer and the schedule. Hence only methods that hand a rebuilt averaged gradient to AdamW
run here (``*-reconstruct``, ``ddp-hook``, ``dense``), not those with their own optimizer.
Trainer checkpoints do not hold the hook's error-feedback residuals or bases: a resumed run
starts them afresh, the same way on every worker.

Two traps, both of plain Trainer: on CPU, accelerate sees the torchrun job only with
``TrainingArguments(use_cpu=True)``; and ``trainer.evaluate()`` before ``trainer.train()`` leaves
the model unwrapped for good (accelerate keeps the model it prepared for evaluation), so no
gradient would be exchanged at all: the callback stops with that explanation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from disttrain.comm.ddp_hook import DisttrainHookState, disttrain_hook
from disttrain.methods import DEFAULT_PER_STEP_METHOD, METHODS, Method, get_method
from disttrain.models.pretrained import INSTALL

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:
    raise ImportError(f"disttrain.integrations.hf needs transformers; install it with: {INSTALL}") from error

log = logging.getLogger(__name__)


def runs_in_trainer(method: Method) -> bool:
    """Whether the method is one gradient exchange per step, applied by a standard optimizer."""
    return method.engine in ("disttrain", "ddp_hook") and method.optimizer == "adamw"


class DisttrainCallback(TrainerCallback):
    """Puts disttrain_hook on the Trainer's DDP model and adds the bytes it sent to every log."""

    def __init__(self, trainer: Trainer, method: Method):
        self.trainer = trainer
        self.method = method
        self.hook_state: DisttrainHookState | None = None
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
            log.info("one process: no gradients to exchange")
            return
        self.hook_state = DisttrainHookState(
            wrapped.module.parameters(), self.method.compression, args.seed, wrapped.process_group
        )
        wrapped.register_comm_hook(self.hook_state, disttrain_hook)
        self._ddp = wrapped
        log.info("gradients exchanged by disttrain method %r", self.method.name)

    @property
    def exchanges(self) -> int:
        """Gradient exchanges so far (one per optimizer step)."""
        return 0 if self.hook_state is None else self.hook_state.step

    @property
    def bytes_sent(self) -> int:
        """Bytes this worker put into collectives: payloads, int8 scales, basis broadcasts."""
        return 0 if self.hook_state is None else self.hook_state.payload_bytes

    @property
    def dense_bytes(self) -> int:
        """What DDP's dense fp32 all-reduce would have put in for the same exchanges."""
        if self._ddp is None:
            return 0
        return self.exchanges * sum(4 * p.numel() for p in self._ddp.module.parameters() if p.requires_grad)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.hook_state is None or logs is None:
            return
        counts = {"bytes_sent": self.bytes_sent, "dense_bytes": self.dense_bytes}
        logs.update(counts)
        state.log_history[-1].update(counts)


def compress_gradients(trainer: Trainer, method: str = DEFAULT_PER_STEP_METHOD) -> DisttrainCallback:
    """Make ``trainer`` exchange gradients as disttrain ``method`` does (seeded by
    ``trainer.args.seed``); returns the callback, which counts the bytes."""
    chosen = get_method(method)
    if not runs_in_trainer(chosen):
        usable = ", ".join(name for name, m in METHODS.items() if runs_in_trainer(m))
        raise ValueError(
            f"method {method!r} does not run inside Trainer, which keeps its own optimizer and takes one "
            f"averaged gradient per step; choose one of: {usable}"
        )
    callback = DisttrainCallback(trainer, chosen)
    # First in line, so that the byte counts it adds to a log reach the printers and reporters.
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
