"""GradMemLM: a causal LM that writes a context into memory and answers from it, as one nn.Module.

The module owns what meta-training learns besides the LM: the initial memory M0, an optional
write head and an optional memory projection. `forward` runs the inner loop (`gradmem_fast.write`)
on the context and reads the query from the written memory; with grad_mode="second" the outer
loss backpropagates through every write step into M0, the LM, the write head and the projection.
It works in a plain loop and under transformers.Trainer (batch keys = forward's argument names).
"""
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from . import api, validation

CONFIG_NAME = "gradmem_config.json"
WEIGHTS_NAME = "gradmem.safetensors"
IGNORE_INDEX = -100
SETTINGS = ("memory_size", "steps", "lr", "grad_mode", "second_order_steps", "write_head", "memory_proj",
            "clip_value", "clip_norm", "inner_loss_weight", "backend")


@dataclass
class GradMemLMOutput(ModelOutput):
    """loss: scalar or None; logits (B, Tq, V), logits[:, i] predicting input_ids[:, i];
    memory (B, m, d) the written memory (pre-projection); inner_losses (B, K) float32."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    memory: Optional[torch.Tensor] = None
    inner_losses: Optional[torch.Tensor] = None


class GradMemLM(nn.Module):
    """A Hugging Face causal LM wrapped with a learned initial memory and the GradMem write.

    model: the causal LM (a submodule). memory_size: m rows of the LM's hidden size d.
    steps, lr: K write steps of size lr (forward's `steps` overrides K per call).
    grad_mode: "none" | "first" | "second" (see gradmem_fast.write); second_order_steps: only the
    last j steps second order (None: all).
    write_head: True adds a separate (V, d) head for the write loss, a copy of the LM head.
    memory_proj: True adds a Linear(d, d), identity weight and zero bias, applied to the memory.
    clip_value, clip_norm: per-step gradient clipping of the write. inner_loss_weight: the loss adds
    this times the mean over samples of the last inner loss. backend: as in gradmem_fast.write.
    The new tensors take the LM's dtype and device.
    """

    def __init__(self, model, memory_size, *, steps, lr, grad_mode="second", second_order_steps=None,
                 write_head=False, memory_proj=False, clip_value=None, clip_norm=None, inner_loss_weight=0.0,
                 backend="auto"):
        super().__init__()
        if not isinstance(model, nn.Module) or model.get_output_embeddings() is None:
            raise ValueError(f"model must be a causal LM with an output head, got {type(model).__name__}")
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(f"memory_size must be an int >= 1, got {memory_size!r}")
        validation.check_options(steps, lr, clip_value, clip_norm, grad_mode, backend)
        for name, value in (("write_head", write_head), ("memory_proj", memory_proj)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if isinstance(inner_loss_weight, bool) or not isinstance(inner_loss_weight, (int, float)) \
                or not inner_loss_weight >= 0 or inner_loss_weight == float("inf"):
            raise ValueError(f"inner_loss_weight must be a finite number >= 0, got {inner_loss_weight!r}")
        if second_order_steps is not None:
            if grad_mode != "second":
                raise ValueError(f"second_order_steps={second_order_steps!r} needs grad_mode='second', "
                                 f"got {grad_mode!r}")
            if isinstance(second_order_steps, bool) or not isinstance(second_order_steps, int) \
                    or not 0 <= second_order_steps <= steps:
                raise ValueError(f"second_order_steps must be an int in [0, steps={steps}], "
                                 f"got {second_order_steps!r}")
        self.model = model
        self.memory_size, self.steps, self.lr, self.grad_mode = memory_size, steps, float(lr), grad_mode
        self.second_order_steps, self.clip_value, self.clip_norm = second_order_steps, clip_value, clip_norm
        self.inner_loss_weight, self.backend = float(inner_loss_weight), backend
        head = model.get_output_embeddings().weight
        d, V = model.config.hidden_size, head.shape[0]
        factory = dict(dtype=head.dtype, device=head.device)
        self.memory = nn.Parameter(torch.randn(memory_size, d, **factory) * 0.02)
        self.write_head = None
        if write_head:
            self.write_head = nn.Linear(d, V, bias=False, **factory)
            with torch.no_grad():
                self.write_head.weight.copy_(head)
        self.memory_proj = None
        if memory_proj:
            self.memory_proj = nn.Linear(d, d, **factory)
            with torch.no_grad():
                self.memory_proj.weight.copy_(torch.eye(d, **factory))
                self.memory_proj.bias.zero_()

    @property
    def config(self):
        return self.model.config

    def settings(self):
        """The constructor's keyword arguments, with write_head / memory_proj as booleans."""
        out = {name: getattr(self, name) for name in SETTINGS}
        out["write_head"], out["memory_proj"] = self.write_head is not None, self.memory_proj is not None
        return out

    def _write(self, context_ids, context_mask, steps):
        steps = self.steps if steps is None else steps
        second_order_steps = self.second_order_steps
        if second_order_steps is not None and isinstance(steps, int):
            second_order_steps = min(second_order_steps, steps)  # the last j steps; a call may ask for fewer
        return api.write(self.model, self.memory, context_ids, context_mask, steps=steps, lr=self.lr,
                         write_head=self.write_head, memory_proj=self.memory_proj, clip_value=self.clip_value,
                         clip_norm=self.clip_norm, grad_mode=self.grad_mode, second_order_steps=second_order_steps,
                         backend=self.backend, return_losses=True)

    def write(self, context_ids, context_mask=None, steps=None):
        """The written memory (B, m, d) for the context (B, Tc) with its right-padded mask."""
        memory, _ = self._write(context_ids, context_mask, steps)
        return memory

    def forward(self, context_ids, input_ids, labels=None, context_mask=None, attention_mask=None, steps=None):
        """Write `context_ids`, then read `input_ids` from the written memory.

        labels (B, Tq): labels[:, i] is the target of logits[:, i] (the last memory row predicts
        input_ids[:, 0]); -100 is ignored. loss = mean cross-entropy over the targets +
        inner_loss_weight * mean_b(last inner loss).
        """
        self._check_batch(context_ids, input_ids, labels)
        memory, inner_losses = self._write(context_ids, context_mask, steps)
        logits = api.read(self.model, memory, input_ids, attention_mask, memory_proj=self.memory_proj)
        loss = None
        if labels is not None:
            V = logits.shape[-1]
            logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
            loss = F.cross_entropy(logits32.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
            if self.inner_loss_weight and inner_losses.shape[1] > 0:
                loss = loss + self.inner_loss_weight * inner_losses[:, -1].mean()
        return GradMemLMOutput(loss=loss, logits=logits, memory=memory, inner_losses=inner_losses)

    def _check_batch(self, context_ids, input_ids, labels):
        for name, ids in (("context_ids", context_ids), ("input_ids", input_ids)):
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"{name} must be a 2-D integer tensor (B, T), got {shape}")
        if context_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"context_ids batch {context_ids.shape[0]} != input_ids batch {input_ids.shape[0]}")
        if labels is None:
            return
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels shape {shape} != input_ids shape {tuple(input_ids.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
        if not (labels != IGNORE_INDEX).any():
            raise ValueError("labels hold no target (every entry is -100)")
        V = self.model.get_output_embeddings().weight.shape[0]
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
        if bad.any():
            raise ValueError(f"label {int(labels[bad][0])} is outside [0, {V}) and is not -100")

    def generate(self, memory, input_ids, attention_mask=None, **generate_kwargs):
        """Generate after the written memory (B, m, d); returns what model.generate returns."""
        return api.generate(self.model, memory, input_ids, attention_mask, memory_proj=self.memory_proj,
                            **generate_kwargs)

    def own_state_dict(self):
        """The module's own tensors (memory, write head, projection), without the LM's."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def save_pretrained(self, path, **model_kwargs):
        """The LM in its usual HF layout plus gradmem_config.json and gradmem.safetensors."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, **model_kwargs)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.own_state_dict().items()}
        save_file(tensors, os.path.join(path, WEIGHTS_NAME))
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(self.settings(), f, indent=2)

    @classmethod
    def from_pretrained(cls, path, model=None, **model_kwargs):
        """Load what save_pretrained stored; `model` (an LM already loaded) skips loading the LM from path."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        config_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ValueError(f"{path!r} holds no {CONFIG_NAME} (not saved by GradMemLM.save_pretrained)")
        with open(config_path) as f:
            settings = json.load(f)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
        memory_size = settings.pop("memory_size")
        module = cls(model, memory_size, **settings)
        tensors = load_file(os.path.join(path, WEIGHTS_NAME), device=str(module.memory.device))
        missing = set(module.own_state_dict()) ^ set(tensors)
        if missing:
            raise ValueError(f"{WEIGHTS_NAME} in {path!r} does not match the settings: {sorted(missing)}")
        module.load_state_dict(tensors, strict=False)
        return module


__all__ = ["GradMemLM", "GradMemLMOutput"]
