"""One training step (forward, backward, gradient norm, optimizer step): eager (through DDP
when distributed), replayed from a CUDA graph, or checked before every update
(trainer.skip_nonfinite); its forward pass and loss compiled with torch.compile when
trainer.compile asks (composed with the CUDA graph unless the compile mode makes its own).
`make_step` builds the one the trainer settings ask for; every step is called as `step(x, y)`
and returns the loss terms as device tensors (None: a skipped step). Only the checked step
syncs with the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vae_exp.config import ConfigError, one_line
from vae_exp.losses import VAELoss

log = logging.getLogger(__name__)

Terms = dict[str, Tensor]
Step = Callable[[Tensor, Tensor], Terms | None]
TermsFn = Callable[[Tensor, Tensor], Terms]  # (x, y) -> the loss terms of the batch

# torch.compile modes that capture CUDA graphs of their own (vae_exp's capture is then off)
COMPILE_MODES_WITH_GRAPHS = ("reduce-overhead", "max-autotune")


def grad_norm(model: nn.Module) -> Tensor:
    """The L2 norm of all gradients together (a device scalar; NaN/Inf if any is): one
    multi-tensor norm (torch._foreach_norm) instead of a kernel per parameter tensor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def forward_loss(
    net: nn.Module,
    loss_fn: VAELoss,
    x: Tensor,
    y: Tensor | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
) -> Terms:
    """The loss terms of batch `x` (labels `y`): the forward pass in bf16 autocast when
    precision is "bf16" (the loss itself always in fp32), on a channels_last input when asked,
    with as many posterior samples per image as the loss asks for (`loss_fn.samples`), their
    noise drawn from `generator` or given (`eps`, see VAE.forward)."""
    inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    bf16 = precision == "bf16"
    # cache_enabled=False: autocast's weight cache must be off inside CUDA graph capture.
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
        out = net(inputs, y, samples=loss_fn.samples, generator=generator, eps=eps)
    return loss_fn(out.float(), x)


def terms_function(
    net: nn.Module, loss_fn: VAELoss, precision: str, channels_last: bool
) -> TermsFn:
    """`forward_loss` of `net` (the model or its DDP wrapper) as a function of the batch."""

    def terms(x: Tensor, y: Tensor) -> Terms:
        return forward_loss(net, loss_fn, x, y, precision, channels_last)

    return terms


class CompiledTerms:
    """A terms function compiled with torch.compile (forward and loss in one graph, so their
    pointwise work fuses; the backward is compiled too). The noise still comes from PyTorch's
    own generator (inductor's fallback_random, set for this compile only), as in the eager
    step, so a CUDA graph replays fresh noise. If compiling fails (an unsupported combination
    of this torch, device and model), the first step says why and every step runs the eager
    function."""

    def __init__(self, terms: TermsFn, mode: str) -> None:
        self.eager, self.mode = terms, mode
        self.works: bool | None = None  # unknown until the first step has run
        try:
            from torch._inductor import list_mode_options

            # the mode's own options, plus aten's random ops (this compile only)
            options = {**list_mode_options(mode)}  # "default" -> {}
            options["fallback_random"] = True
            self.compiled = torch.compile(terms, options=options)
        except Exception as e:  # torch.compile refuses this platform or setting
            self.failed(e)

    def failed(self, error: Exception) -> None:
        log.warning("torch.compile(%s) failed, training without it: %s", self.mode, one_line(error))
        self.works = False

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> Terms:
        """Forward, loss and backward (see `loss_and_gradients`), compiled where possible."""
        if self.works is False:
            return backward(self.eager(x, y), model)
        if self.works:
            return backward(self.compiled(x, y), model)
        try:
            result = backward(self.compiled(x, y), model)
        except Exception as e:  # compiling failed: this step is taken again, eagerly
            log.warning("torch.compile(%s) failed, training without it: %s", self.mode, one_line(e))
            self.works = False
            for p in model.parameters():
                p.grad = None
            return backward(self.eager(x, y), model)
        self.works = True
        return result


def backward(terms: Terms, model: nn.Module) -> Terms:
    """Backpropagate the loss; the terms, detached, with the gradient norm."""
    terms["loss"].backward()
    terms["grad_norm"] = grad_norm(model)
    return {k: v.detach() for k, v in terms.items()}


def loss_and_gradients(terms: TermsFn | CompiledTerms, model: nn.Module, x: Tensor, y) -> Terms:
    """Forward, backward and the gradient norm of one batch (no optimizer step): the loss
    terms, detached, with `grad_norm`."""
    if isinstance(terms, CompiledTerms):
        return terms.run(model, x, y)
    return backward(terms(x, y), model)


def eager_step(terms: TermsFn | CompiledTerms, model, optimizer, keep_grads: bool = False) -> Step:
    """The plain PyTorch step of the terms function `terms` (forward + loss, through DDP
    when distributed). `keep_grads`: zero the gradient tensors instead of freeing them (they
    belong to a graph)."""

    def step(x: Tensor, y: Tensor) -> Terms:
        optimizer.zero_grad(set_to_none=not keep_grads)
        result = loss_and_gradients(terms, model, x, y)
        optimizer.step()
        return result

    return step


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Switch Adam-style optimizers to (or from) their CUDA-graph-safe form, whose step
    counters live on the parameters' device. Also needed after loading a state saved by a run
    that used the other form."""
    if "capturable" not in optimizer.defaults:
        return
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state and torch.is_tensor(state["step"]):
                on_device = capturable or group.get("fused")  # fused kernels want it there too
                device = p.device if on_device else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


def cuda_graph_blocker(trainer, device: torch.device, optimizer, distributed: bool) -> str | None:
    """Why the training step cannot be captured in a CUDA graph here (None: it can)."""
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if distributed:
        return "training is distributed (DDP)"
    if trainer.skip_nonfinite:
        return "trainer.skip_nonfinite needs a host check before every optimizer step"
    if trainer.compile in COMPILE_MODES_WITH_GRAPHS:
        return f"trainer.compile={trainer.compile} makes CUDA graphs of its own"
    if "capturable" not in optimizer.defaults:
        return f"{type(optimizer).__name__} has no capturable (CUDA-graph-safe) form"
    return None


def use_cuda_graph(trainer, device: torch.device, optimizer, distributed: bool) -> bool:
    """trainer.cuda_graph: auto = wherever possible; true = required (a config error if it
    cannot be); false = never."""
    if trainer.cuda_graph is False:
        return False
    blocker = cuda_graph_blocker(trainer, device, optimizer, distributed)
    if blocker is None:
        return True
    if trainer.cuda_graph is True:
        raise ConfigError(
            f"Invalid config: trainer.cuda_graph=true but the step cannot be captured: {blocker}. "
            "allowed: auto (capture where possible) | false."
        )
    return False


class CapturedStep:
    """The whole training step (forward with the reparameterisation noise, backward, gradient
    norm, optimizer step) captured in one CUDA graph and replayed for every full batch.

    The first `warmup` steps run eagerly on a side stream (they are real training steps: the
    graph is captured from a warmed-up model, as PyTorch's docs require, and a compiled terms
    function compiles there); then the step is captured on the current batch and replayed
    with each new batch copied into the static input buffers. The noise is drawn inside the
    graph from CUDA's default generator (graph replays advance it, so every step gets fresh
    noise). Adam runs in its capturable form (fused or not). Batches of another shape (the
    last, partial one) take an eager step. A change of learning rate (a scheduler, once per
    epoch) re-captures, since the graph holds the rate it saw. If the capture fails, training
    goes on with eager steps (`required`: the error stops it).
    """

    def __init__(
        self,
        terms: TermsFn | CompiledTerms,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        required: bool = False,
        warmup: int = 3,
    ):
        self.terms, self.model, self.optimizer = terms, model, optimizer
        self.required = required  # trainer.cuda_graph=true: a failed capture stops the run
        self.failed = False  # auto: after a failed capture, every step runs eagerly
        self.batch_size = batch_size  # batches of this size are captured; others run eagerly
        self.eager = eager_step(terms, model, optimizer)
        # After capture, eager steps must write into the graph's own gradient tensors.
        self.eager_in_graph = eager_step(terms, model, optimizer, keep_grads=True)
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x = self.static_y = None
        self.static_terms: Terms = {}
        self.captured_lrs: list[float] = []
        set_capturable(optimizer, True)

    def __call__(self, x: Tensor, y: Tensor) -> Terms:
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        if self.graph is not None and lrs != self.captured_lrs:
            self.graph = None  # re-captured below with the new rate
        if self.failed:
            return self.eager(x, y)
        if len(x) != self.batch_size:
            eager = self.eager if self.graph is None else self.eager_in_graph
            return eager(x, y)  # a partial batch
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                terms = self.eager(x, y)
            torch.cuda.current_stream().wait_stream(side)
            if self.static_x is None:
                self.static_x, self.static_y = x.clone(), y.clone()
            return terms
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if self.graph is None:
            try:
                self.capture()
            except RuntimeError as e:
                if self.required:
                    raise
                self.failed = True
                log.warning("CUDA graph capture failed (%s); eager steps from here on", e)
                return self.eager(x, y)
            self.captured_lrs = lrs
        self.graph.replay()
        return self.static_terms

    def capture(self) -> None:
        """Record one step on the static buffers (recording runs nothing)."""
        self.optimizer.zero_grad(set_to_none=True)  # gradients get allocated in the graph
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may use CUDA during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_terms = loss_and_gradients(
                self.terms, self.model, self.static_x, self.static_y
            )
            self.optimizer.step()
        self.graph = graph
        log.info("training step captured in a CUDA graph (batch %s)", tuple(self.static_x.shape))


def careful_step(terms: TermsFn | CompiledTerms, model, optimizer) -> Step:
    """An eager step that checks the loss and gradients before updating (a host sync every
    step): a non-finite step is skipped (no update; BatchNorm statistics restored), logged,
    and returns None (trainer.skip_nonfinite counts these)."""

    def step(x: Tensor, y: Tensor) -> Terms | None:
        saved_buffers = [b.clone() for b in model.buffers()]
        optimizer.zero_grad(set_to_none=True)
        result = loss_and_gradients(terms, model, x, y)
        if (torch.isfinite(result["loss"]) & torch.isfinite(result["grad_norm"])).item():
            optimizer.step()
            return result
        for b, saved in zip(model.buffers(), saved_buffers):
            b.copy_(saved)
        log.warning("skipped non-finite step: %s", describe(result))
        return None

    return step


def describe(terms: Terms) -> str:
    """Loss terms as 'name=value, ...' (a host sync)."""
    return ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in terms.items())


def make_step(model, loss_fn, optimizer, *, trainer, cluster, batch_size: int) -> tuple[Step, str]:
    """The training step the trainer settings ask for, and its description for the log:
    checked before every update (trainer.skip_nonfinite), replayed from a CUDA graph, or eager
    (through DDP when distributed); its forward and loss compiled when trainer.compile is set.
    Every step is called as `step(x, y)` and returns the loss terms (device tensors), or None
    for a skipped step. Call it after the optimizer's state is loaded (resume)."""
    device = next(model.parameters()).device
    captured = use_cuda_graph(trainer, device, optimizer, cluster.distributed)
    set_capturable(optimizer, captured)
    parts = ["CUDA graph" if captured else "eager", trainer.precision]
    if optimizer.defaults.get("fused"):
        parts.append(f"fused {type(optimizer).__name__}")
    if trainer.compile:
        parts.append(f"torch.compile({trainer.compile})")
    if trainer.channels_last:
        parts.append("channels_last")
    if cluster.distributed:
        parts.append(f"DDP x{cluster.world_size}")
    if trainer.skip_nonfinite:
        parts.append(f"skipping up to {trainer.skip_nonfinite} non-finite steps")
    net = model
    if cluster.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    terms = terms_function(net, loss_fn, trainer.precision, trainer.channels_last)
    if trainer.compile:
        terms = CompiledTerms(terms, trainer.compile)
    if captured:
        step = CapturedStep(terms, model, optimizer, batch_size, trainer.cuda_graph is True)
    elif trainer.skip_nonfinite:
        step = careful_step(terms, model, optimizer)
    else:
        step = eager_step(terms, model, optimizer)
    return step, ", ".join(parts)
