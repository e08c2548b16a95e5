"""Knowledge distillation (Hinton et al. 2015): a trained teacher's softened outputs as a second
target; after channel pruning the dense model teaches its pruned copy, a common way to recover
part of what the cut removed (measured here: README, "Structured pruning of the strong brain
model")."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medxfer.errors import MedxferError


@dataclass
class Teacher:
    """What ``fit`` distills from: a trained model, the weight ``alpha`` of the distillation term
    and the softmax ``temperature``."""

    model: nn.Module
    alpha: float
    temperature: float = 4.0

    def __post_init__(self) -> None:
        check(self.alpha, self.temperature)


def check(alpha: float, temperature: float) -> None:
    """One clear message for a distillation weight outside (0, 1] or a temperature <= 0."""
    if not 0.0 < alpha <= 1.0:
        raise MedxferError(
            f"distillation weight {alpha} is outside (0, 1]",
            "give a weight such as 0.7 (0 switches distillation off)",
        )
    if temperature <= 0:
        raise MedxferError(f"distillation temperature {temperature} is not positive",
                           "give a temperature such as 4")  # fmt: skip


class DistillationLoss(nn.Module):
    """``(1 - alpha) * task_loss(logits, y) + alpha * T^2 * KL(teacher_T || student_T)``, the
    teacher run in eval mode without gradients on the same (augmented) batch. The T^2 keeps the
    gradient scale of the soft term independent of T. Called with the input batch as third
    argument (``takes_input``)."""

    takes_input = True

    def __init__(self, task_loss: nn.Module, teacher: Teacher, device: torch.device,
                 channels_last: bool) -> None:  # fmt: skip
        super().__init__()
        self.task_loss = task_loss
        model = copy.deepcopy(teacher.model).to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        self.teacher = model  # the loss is never saved or optimized: only the student is
        self.alpha, self.temperature = teacher.alpha, teacher.temperature

    def forward(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        task = self.task_loss(logits, y)
        with torch.no_grad():
            soft_target = F.log_softmax(self.teacher(x).float() / self.temperature, dim=1)
        soft = F.kl_div(F.log_softmax(logits.float() / self.temperature, dim=1), soft_target,
                        reduction="batchmean", log_target=True)  # fmt: skip
        return (1 - self.alpha) * task + self.alpha * self.temperature**2 * soft
