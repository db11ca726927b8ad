"""HF transformers' ``Trainer`` saving a ShardedRMSprop whole (imports ``transformers``)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import sharded_optimizer_in

__all__ = ["ShardedRMSpropCallback"]


class ShardedRMSpropCallback(TrainerCallback):
    """Gathers a ShardedRMSprop's whole state on rank 0 whenever ``Trainer`` is about to save a
    checkpoint, so the ``optimizer.pt`` it writes from rank 0 alone holds every rank's state
    and ``resume_from_checkpoint`` continues at any world size.

    ``Trainer(model, args, optimizers=(ShardedRMSprop(...), scheduler),
    callbacks=[ShardedRMSpropCallback()])``. Trainer decides to save at the end of a step or an
    epoch (``control.should_save``, set alike on every rank by its flow callback, which runs
    before this one); with ``save_strategy="best"`` it decides after evaluating, so the state
    is gathered after every evaluation. With ``save_on_each_node`` every rank gets the whole
    state. Does nothing for other optimizers and with ``save_only_model``.
    """

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            self._consolidate(args, kwargs.get("optimizer"))

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if control.should_save:
            self._consolidate(args, kwargs.get("optimizer"))

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.save_strategy == "best":
            self._consolidate(args, kwargs.get("optimizer"))

    @staticmethod
    def _consolidate(args: TrainingArguments, optimizer: Any) -> None:
        sharded = sharded_optimizer_in(optimizer)
        if sharded is not None and not args.save_only_model:
            # the saving process: rank 0, or each node's first with save_on_each_node
            sharded.consolidate_state_dict(to=None if args.save_on_each_node else 0)
