"""What every LightningModule of the project shares (UniViGU and the autoregressive baseline):
the learning-rate schedule, hyper-parameters that keep injected parts when a config made them,
an optimiser factory that is injected rather than built inside the module, the skipping of
non-finite steps (with the gradient clipping that decides it), and the compiled training step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from lightning_vigu.loggers import log_step_values


def warmup_cosine(step: int, warmup_steps: int, horizon: int | None, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then cosine decay to
    ``min_ratio`` at ``horizon`` (constant when the horizon is unknown or inside the warm-up)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if horizon is None or horizon <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (horizon - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def save_config_hyperparameters(module: L.LightningModule, injected: Sequence[str]) -> None:
    """``save_hyperparameters`` that keeps injected parts when they come from a config.

    Under LightningCLI the hyper-parameters are the parsed config, where injected parts are
    ``class_path`` entries, so ``load_from_checkpoint`` rebuilds them. Instances passed from
    Python are not serialisable hyper-parameters and are left out (pass them again on load).

    Inside ``__init__`` both cases receive instances; only Lightning's private
    ``_given_hyperparameters`` context (set by LightningCLI around the call) tells them apart,
    and Lightning has no public equivalent (2.6). ``tests/test_configs.py`` pins both cases.
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    from_cli = _given_hyperparameters.get() is not None
    module.save_hyperparameters(
        ignore=None if from_cli else list(injected), frame=inspect.currentframe().f_back
    )


COMPILE_MODES = ("none", "blocks", "model", "cudagraphs", "autotune", "step")
# the whole-transformer modes and torch.compile's mode for each (``autotune``: inductor times
# candidate kernels for each matrix multiply at compile time, minutes on a GPU)
_TORCH_MODES = {
    "model": None,
    "cudagraphs": "reduce-overhead",
    "autotune": "max-autotune-no-cudagraphs",
}


def compile_transformer(model: nn.Module, mode: str) -> tuple[nn.Module, bool]:
    """Compile ``model`` for training as ``mode`` (one of :data:`COMPILE_MODES`).

    Returns the transformer the training step calls and whether its calls replay CUDA graphs
    (the step must then mark where it begins). ``blocks`` compiles every block in place, so
    sampling runs them too. ``model``, ``cudagraphs`` and ``autotune`` compile a training-only
    wrapper around the same weights: sampling and validation run the transformer eagerly, so
    their batch shapes (a few clips, doubled for guidance) never wait for a compilation or a graph
    recording, which cost 36 s at the first sample logging of a `small` run on an H200. ``step``
    leaves ``model`` as it is: the step's whole tensor work is compiled instead
    (:meth:`CompiledTrainingStep.compile_for_training`).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown model.compile '{mode}'; choose one of {COMPILE_MODES}")
    if mode == "blocks":
        if not hasattr(model, "blocks"):
            raise ValueError(
                f"model.compile 'blocks' compiles a transformer's blocks, and "
                f"{type(model).__name__} has none; choose 'none', 'model', 'cudagraphs' or "
                "'autotune'"
            )
        for block in model.blocks:
            block.compile()
    elif mode in _TORCH_MODES:
        return torch.compile(model, mode=_TORCH_MODES[mode]), mode == "cudagraphs"
    return model, False


class CompiledTrainingStep(L.LightningModule):
    """A LightningModule whose training step may call a compiled wrapper of its network
    (:func:`compile_transformer`), or a compiled function of the step's whole tensor work
    (``step`` mode), while sampling, validation and copies run eagerly.

    :meth:`compile_for_training` keeps the wrappers as plain attributes, not submodules (the
    weights are the network's), which copies (EMA's average) drop; :meth:`for_training` gives
    the network the training step calls and :meth:`compiled_step` the compiled step function;
    :meth:`begin_training_step` marks where a step begins when they replay CUDA graphs (the
    previous step's graph outputs may be overwritten from then on).
    """

    _cudagraphs = False

    def compile_for_training(
        self, network: nn.Module, mode: str, step: Callable | None = None
    ) -> None:
        """Compile ``network`` as ``mode``; the ``step`` mode compiles ``step`` instead (the
        function of the step's tensor work, the network's forward included: one graph for
        forward and losses, and one for their backward), replayed as CUDA graphs."""
        self.__dict__["_compiled"], self._cudagraphs = compile_transformer(network, mode)
        self.__dict__["_compiled_step"] = None
        if mode == "step":
            if step is None:
                raise ValueError(
                    "model.compile 'step' compiles the unified model's loss with its transformer; "
                    "this module takes 'none', 'model', 'cudagraphs' or 'autotune'"
                )
            self.__dict__["_compiled_step"] = torch.compile(step, mode="reduce-overhead")
            self._cudagraphs = True

    def compiled_step(self) -> Callable | None:
        """The compiled step function in training (``step`` mode), else ``None``."""
        return self.__dict__.get("_compiled_step") if self.training else None

    def for_training(self, network: nn.Module) -> nn.Module:
        """The compiled wrapper of ``network`` in training, else ``network`` (also when
        ``network`` was replaced after compiling, or compiled in place)."""
        compiled = self.__dict__.get("_compiled")
        if not self.training or getattr(compiled, "_orig_mod", None) is not network:
            return network
        return compiled

    def begin_training_step(self) -> None:
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_compiled"] = state["_compiled_step"] = None  # copies never train: eager
        return state


class InjectedOptimizerModule(L.LightningModule):
    """A LightningModule whose optimiser factory is injected (``self._optimizer_factory``).

    Copies (EMA's ``AveragedModel`` deep-copies the module) leave the factory out: under
    LightningCLI it closes over the whole parsed config, DataModule and its shared-memory
    counters included, which cannot be copied.
    """

    _optimizer_factory: OptimizerCallable | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_optimizer_factory"] = None
        return state


class NonFiniteSteps(L.LightningModule):
    """Skips the optimiser steps whose loss is not finite, and stops a run after
    ``hparams.max_nonfinite_steps`` of them in a row.

    Two ways, chosen per run:

    * the optimiser skips by itself (fused AdamW / Adam, no loss scaler): the module tells it
      through ``found_inf`` (as a loss scaler would), decided in
      :meth:`configure_gradient_clipping` from the gradient norm (over every rank's gradients
      under DDP / FSDP clipping, so all ranks skip together) and the loss. Nothing is read on
      the host: the counts live on the device and are checked every ``log_every_n_steps``;
    * otherwise the loss is read on the host and ``training_step`` returns ``None``.

    ``training_step`` calls :meth:`skip_nonfinite`; the clipping hook also clips as configured.
    Logged: ``train/nonfinite_steps`` (in a row) and ``train/skipped_steps`` (in all).
    """

    _nonfinite_in_a_row = 0
    _nonfinite_total = 0

    def skip_nonfinite(self, loss: Tensor, batch_size: int, detail=lambda: "") -> bool:
        """Whether this step must be skipped by returning ``None`` from ``training_step``
        (``detail()``: what the error names when the run stops)."""
        finite = torch.isfinite(loss)
        optimiser = self._skipping_optimiser()
        if optimiser is not None:  # the fused update skips (configure_gradient_clipping)
            self._loss_finite = finite
            self._count_nonfinite_on_device(finite, batch_size)
            return False
        finite = bool(finite)  # read on the host: the CPU, or an optimiser that cannot skip
        self._nonfinite_in_a_row = 0 if finite else self._nonfinite_in_a_row + 1
        self._nonfinite_total += 0 if finite else 1
        counts = {
            "train/nonfinite_steps": float(self._nonfinite_in_a_row),
            "train/skipped_steps": float(self._nonfinite_total),
        }
        log_step_values(self, counts, batch_size=batch_size)
        if self._nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            self._stop_on_nonfinite(self._nonfinite_in_a_row, detail())
        return not finite

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip, and tell an optimiser that skips non-finite steps itself whether to skip.

        FSDP clips by the global norm over shards (Lightning's plugin refuses norm clipping).
        Under bf16 autocast nothing is scaled, so the gradients are clipped here as they are:
        Lightning's mixed-precision plugin refuses to clip for any optimiser that could unscale
        internally (fused AdamW), which only matters with fp16's loss scaler. The skip is
        decided from the gradient norm, which DDP and FSDP clipping compute over every rank's
        gradients, so all ranks skip together when one rank's loss was not finite."""
        norm = self._clip(optimizer, gradient_clip_val, gradient_clip_algorithm)
        skipping = self._skipping_optimiser()
        if skipping is None:
            return
        if norm is None:  # no norm clipping: the norm only decides the skip
            grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
            norm = torch.nn.utils.get_total_norm([g for g in grads if g is not None])
        loss_finite = self.__dict__.get("_loss_finite", torch.ones((), dtype=torch.bool))
        skipping.found_inf = (~torch.isfinite(norm) | ~loss_finite.to(norm.device)).float()

    def _clip(self, optimizer, gradient_clip_val, gradient_clip_algorithm) -> Tensor | None:
        """Clip as configured; the total gradient norm when it was computed."""
        if not gradient_clip_val:
            return None
        if isinstance(self.trainer.strategy, FSDPStrategy):
            return self.trainer.model.clip_grad_norm_(gradient_clip_val)
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
                return None
            return torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        return None

    def _skipping_optimiser(self) -> torch.optim.Optimizer | None:
        """The optimiser when it can skip a non-finite step by itself (fused AdamW / Adam read a
        ``found_inf`` tensor, as under a loss scaler) and no loss scaler uses that already."""
        if self._trainer is None or len(self.trainer.optimizers) != 1:
            return None
        optimiser = self.trainer.optimizers[0]
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = optimiser.defaults.get("fused")
        return optimiser if fused and scaler is None else None

    def _count_nonfinite_on_device(self, finite: Tensor, batch_size: int) -> None:
        """Consecutive and total skipped steps, counted on the device; read on the host (which
        waits for the device) only every ``trainer.log_every_n_steps`` steps, so a run of
        ``max_nonfinite_steps`` is caught at the first check after it."""
        state = self.__dict__.get("_nonfinite_state")
        if state is None or state.device != finite.device:
            state = torch.zeros(3, device=finite.device)  # in a row, worst in a row, total
        bad = (~finite).float()
        run = (state[0] + 1) * bad
        state = torch.stack([run, torch.maximum(state[1], run), state[2] + bad])
        self._nonfinite_state = state  # a new tensor: the logged values stay as they were
        counts = {"train/nonfinite_steps": state[0], "train/skipped_steps": state[2]}
        log_step_values(self, counts, batch_size=batch_size)
        every = max(1, self.trainer.log_every_n_steps)
        if (self.global_step + 1) % every == 0:
            worst = int(state[1])
            if worst >= self.hparams.max_nonfinite_steps:
                self._stop_on_nonfinite(worst)

    def _stop_on_nonfinite(self, in_a_row: int, detail: str = "") -> None:
        losses = f" ({detail})" if detail else ""
        raise RuntimeError(
            f"{in_a_row} consecutive non-finite losses by step {self.global_step}{losses}; "
            "lower the lr, enable gradient clipping (trainer.gradient_clip_val) or check the "
            "data for NaNs"
        )
