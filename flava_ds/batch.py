"""The micro-batch that crosses the project: made by a collator, read by the model, its losses and the trainer.

One typed object from the collator to the loss: the model inputs (the `transformers.FlavaForPreTraining.forward`
keyword arguments, shapes in `Batch`), bookkeeping beside them (`bad_samples`), and the batch kind, which follows
from the inputs in one place (`Batch.kind`). It imports nothing of the project (nor torch at run time), so `data`
builds it and `model` reads it without either importing the other (docs/DESIGN.md §5). A batch also reads like a
mapping of its model inputs (`batch["input_ids"]`, `model(**batch)`), as `transformers` callers expect.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the run config reads KINDS without importing torch
    import torch

KINDS = ("image_text", "image", "text")  # also the names of the training data streams
MODEL_INPUTS = (
    "input_ids",
    "input_ids_masked",
    "attention_mask",
    "pixel_values",
    "bool_masked_pos",
    "mim_labels",
    "mlm_labels",
    "itm_labels",
)


@dataclass
class Batch:
    """input_ids, input_ids_masked, attention_mask (1 = token), mlm_labels: (B, L) long; pixel_values:
    (B, C, S, S) float; bool_masked_pos (B, P) bool and mim_labels (B, P) long (codebook ids of all patches);
    itm_labels (B,) long (1 = matched caption). Labels use the ignore index -100 (`shard_format.IGNORE_INDEX`)."""

    input_ids: torch.Tensor | None = None
    input_ids_masked: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    mim_labels: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None
    itm_labels: torch.Tensor | None = None
    bad_samples: int = 0  # bookkeeping, not a model input: reads of this batch that failed and were replaced

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, torch.Tensor | None]) -> Batch:
        """From model keyword arguments (absent or None: not given); other keys are refused by name."""
        unknown = sorted(set(inputs) - set(MODEL_INPUTS))
        if unknown:
            raise TypeError(f"unknown model input(s) {unknown}; the model takes {list(MODEL_INPUTS)}")
        return cls(**{name: value for name, value in inputs.items() if value is not None})

    @classmethod
    def of(cls, batch: Batch | Mapping[str, torch.Tensor | None]) -> Batch:
        """`batch` itself, or a Batch of a mapping of model inputs."""
        return batch if isinstance(batch, Batch) else cls.from_inputs(batch)

    @property
    def has_text(self) -> bool:
        return self.input_ids is not None or self.input_ids_masked is not None

    @property
    def kind(self) -> str:
        """'image_text', 'image' or 'text': what the inputs make, as in `transformers`."""
        if self.pixel_values is not None:
            return "image_text" if self.has_text else "image"
        return "text"

    @property
    def text_ids(self) -> torch.Tensor | None:
        """The ids the masked-modelling text pass reads: the masked ones when given."""
        return self.input_ids_masked if self.input_ids_masked is not None else self.input_ids

    @property
    def size(self) -> int:
        """B, the number of samples."""
        return next(iter(self.values())).shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in self.items()})

    def pin_memory(self) -> Batch:
        """Called by a DataLoader with `pin_memory=True`."""
        return replace(self, **{k: v.pin_memory() for k, v in self.items()})

    # ---- a mapping of the model inputs given --------------------------------------------------------
    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if f.name in MODEL_INPUTS and getattr(self, f.name) is not None]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((name, getattr(self, name)) for name in self.keys())

    def values(self) -> Iterator[torch.Tensor]:
        return (getattr(self, name) for name in self.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())
