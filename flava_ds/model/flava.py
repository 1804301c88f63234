"""FlavaForPreTraining: the three encoders, heads and losses of docs/DESIGN.md §3 for the three batch kinds.

A `flava_ds.batch.Batch` (or its inputs as keyword arguments, as in `transformers`) is of one kind:
  image-only  (pixel_values, bool_masked_pos, mim_labels)               -> MIM
  text-only   (input_ids[_masked], attention_mask, mlm_labels)           -> MLM
  image-text  (both, plus itm_labels)  -> global contrastive, ITM, MMM-image, MMM-text
Only what the batch kind needs is computed: image-only batches never run an unmasked image pass, a
contrastive-only model never runs the multimodal encoder, and heads only see masked positions.
`objectives.ForwardPlan` decides which passes and heads run; `flava_ds.train.flops` counts the same plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flava_ds.batch import Batch
from flava_ds.model.config import FlavaConfig, merge_overrides, validate_for_tensor_parallel
from flava_ds.model.contrastive import ContrastiveCache, GlobalContrastiveLoss
from flava_ds.model.encoders import ImageEncoder, MultimodalEncoder, TextEncoder
from flava_ds.model.heads import ITMHead, MaskedPredictionHead
from flava_ds.model.hf_io import expect_keys, read_config, read_state_dict, write_checkpoint
from flava_ds.model.objectives import (
    LOSS_NAMES,
    ForwardPlan,
    check_inputs,
    matched_rows,
    mim_targets,
    rows_only,
    target_counts,
)
from flava_ds.model.transformer import positions_first
from flava_ds.parallel import sharding
from flava_ds.parallel.layers import TensorParallelLinearMixin
from flava_ds.parallel.state import data_parallel_group, is_global_rank_zero, tensor_parallel_size
from flava_ds.shard_format import IGNORE_INDEX

NATIVE_FORMAT = "flava_ds"


@dataclass
class FlavaOutput:
    loss: torch.Tensor | None = None  # weighted sum of the terms present
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted terms, keys from LOSS_NAMES
    image_embedding: torch.Tensor | None = None  # (B, projection_dim), L2-normalised (contrastive)
    text_embedding: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # mim, mlm, itm, mmm_*, contrastive_*


class FlavaForPreTraining(nn.Module):
    """Under tensor parallelism (`flava_ds.parallel.state.initialize_parallel` before construction) the encoders'
    attention and MLP projections and the text decoders are split over the TP ranks; `state_dict()` then holds
    this rank's shards and `full_state_dict()` the whole model, which every export uses."""

    def __init__(self, config: FlavaConfig):
        super().__init__()
        config.validate()
        validate_for_tensor_parallel(config, tensor_parallel_size())
        self.config = config
        # Constructors draw from the RNG differently at each TP size (nn.Linear does, megatron's layers do not);
        # initialisation starts from the state construction found, so a seed gives the same weights at any T.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            self._build(config)
        self.apply(self._init_weights)

    def _build(self, config: FlavaConfig) -> None:
        img, txt, mm = config.image, config.text, config.multimodal
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.multimodal_encoder = MultimodalEncoder(config)
        self.image_projection = nn.Linear(img.hidden_size, config.projection_dim)
        self.text_projection = nn.Linear(txt.hidden_size, config.projection_dim)
        self.image_to_mm_projection = nn.Linear(img.hidden_size, mm.hidden_size)
        self.text_to_mm_projection = nn.Linear(txt.hidden_size, mm.hidden_size)
        # shape (1,), not (): DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), config.logit_scale_init))
        self.mim_head = MaskedPredictionHead(img.hidden_size, img.codebook_vocab_size, img.layer_norm_eps)
        self.mlm_head = MaskedPredictionHead(txt.hidden_size, txt.vocab_size, txt.layer_norm_eps, vocab_parallel=True)
        self.mmm_image_head = MaskedPredictionHead(mm.hidden_size, img.codebook_vocab_size, img.layer_norm_eps)
        self.mmm_text_head = MaskedPredictionHead(
            mm.hidden_size, txt.vocab_size, txt.layer_norm_eps, vocab_parallel=True
        )
        self.itm_head = ITMHead(mm.hidden_size)
        self.contrastive = GlobalContrastiveLoss(config.global_backprop_contrastive, config.logit_scale_max)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, TensorParallelLinearMixin):
            module.init_normal_(std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- checkpoints --------------------------------------------------------------------------------
    def full_state_dict(self, local: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The state dict at tensor-parallel size 1 (shards gathered, vocabulary padding dropped) on every rank.
        Collective over the TP group; equals `state_dict()` without tensor parallelism. `local` overrides this
        rank's tensors by name (e.g. DeepSpeed's fp32 master weights of a bf16 model)."""
        return sharding.full_state_dict(self, local)

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a TP = 1 state dict; under tensor parallelism each rank keeps its shards."""
        sharding.load_full_state_dict(self, state)

    def save_pretrained(self, directory: str | Path) -> None:
        """Our own export: `config.json` (format flava_ds, the FlavaConfig) + fp32 `model.safetensors`.
        The same files at any TP size: every rank calls it (collective under TP), global rank 0 writes."""
        state = {k: v.float() for k, v in self.full_state_dict().items()}
        if is_global_rank_zero():
            write_checkpoint(directory, {"format": NATIVE_FORMAT, "model": self.config.to_dict()}, state)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **config_overrides) -> FlavaForPreTraining:
        """Load our export or a `transformers` directory, whichever `directory` holds."""
        raw = read_config(directory)
        if raw.get("format") != NATIVE_FORMAT:
            return cls.from_hf_pretrained(directory, **config_overrides)
        model = cls(FlavaConfig.from_dict(merge_overrides(raw["model"], config_overrides)))
        state = read_state_dict(directory)
        expect_keys(str(directory), set(state), set(model.state_dict()))
        model.load_full_state_dict(state)
        return model

    @classmethod
    def from_hf_pretrained(cls, directory: str | Path, **config_overrides) -> FlavaForPreTraining:
        """Load a `transformers.FlavaForPreTraining.save_pretrained` directory (no transformers import)."""
        from flava_ds.model.interop import load_hf_pretraining

        return load_hf_pretraining(cls, directory, config_overrides)

    def save_hf_pretrained(self, directory: str | Path, codebook: nn.Module | None = None) -> None:
        """Write a directory that `transformers.FlavaForPreTraining.from_pretrained` loads (codebook optional).
        Every rank calls it (collective under TP), global rank 0 writes."""
        from flava_ds.model.interop import save_hf_pretraining

        save_hf_pretraining(self, directory, codebook)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        batch: Batch | None = None,
        loss_normalizers: Mapping[str, float] | None = None,
        contrastive_cache: ContrastiveCache | None = None,
        **inputs: torch.Tensor,
    ) -> FlavaOutput:
        """A `Batch`, or its model inputs as keyword arguments as in `transformers.FlavaForPreTraining.forward`
        (input_ids, input_ids_masked, attention_mask, mlm_labels: (B, L); pixel_values: (B, C, S, S);
        bool_masked_pos, mim_labels: (B, P), codebook ids for all patches; itm_labels: (B,); ignore index -100).

        `loss_normalizers` (keys from LOSS_NAMES): a term named there is its summed per-target losses divided by
        that number instead of their mean over this batch (see `loss_normalizers()`), so a trainer can make every
        term a mean over the global batch of a step; None or a name absent: this batch's mean, as `transformers`.
        With `loss_normalizers`, MMM and the contrastive rows are the matched pairs only, even when a batch has
        none (`transformers` then falls back to all rows, which would make the loss depend on how a global batch
        is cut). `contrastive_cache` (with `loss_normalizers`): the contrastive term scores against the columns of
        the step's whole global batch under accumulation (see `ContrastiveCache`).
        """
        if batch is None:
            batch = Batch.from_inputs(inputs)
        elif inputs or not isinstance(batch, Batch):
            raise TypeError("FlavaForPreTraining.forward: pass a Batch or the model inputs as keyword arguments")
        check_inputs(self.config, batch)
        plan = ForwardPlan.of(self.config, batch)
        if plan.kind == "image_text":
            return self._image_text(batch, plan, loss_normalizers, contrastive_cache)
        paths = {"image": self._image_only, "text": self._text_only}
        return paths[plan.kind](batch, plan, loss_normalizers or {})

    def _image_only(self, b: Batch, plan: ForwardPlan, normalizers: Mapping[str, float]) -> FlavaOutput:
        out, targets = FlavaOutput(), None
        if "mim" in plan.heads:
            targets = F.pad(mim_targets(b.mim_labels, b.bool_masked_pos), (1, 0), value=IGNORE_INDEX)  # (B, 1+P)
        index = _target_positions(targets)
        _, image = self.image_encoder(b.pixel_values, b.bool_masked_pos, index)
        if targets is not None:
            mim = targets.gather(1, index)
            self._masked_prediction(out, "mim", self.mim_head, image, mim, self.config.mim_weight, normalizers)
        return self._finish(out)

    def _text_only(self, b: Batch, plan: ForwardPlan, normalizers: Mapping[str, float]) -> FlavaOutput:
        out = FlavaOutput()
        targets = b.mlm_labels if "mlm" in plan.heads else None
        index = _target_positions(targets)
        _, text = self.text_encoder(b.text_ids, _padding_mask(b.attention_mask), index)
        if targets is not None:
            mlm = targets.gather(1, index)
            self._masked_prediction(out, "mlm", self.mlm_head, text, mlm, self.config.mlm_weight, normalizers)
        return self._finish(out)

    def loss_normalizers(
        self, micro_batches: Sequence[Batch | Mapping[str, torch.Tensor]], across_ranks: bool = False
    ) -> dict[str, float]:
        """`forward`'s `loss_normalizers` for one optimizer step: per loss term, the step's global target count
        (`objectives.target_counts` over these micro-batches, with `across_ranks` summed over the data-parallel ranks:
        collective) / (ranks x micro-batches). A trainer dividing each micro-step's loss by the number of
        micro-batches and averaging gradients over the ranks (as DeepSpeed does) then applies the gradient of (all
        per-target losses of the step) / (their global count): the same update whatever cut of the global batch
        the ranks and micro-steps make."""
        counts = torch.zeros(len(LOSS_NAMES), dtype=torch.float64)
        for batch in micro_batches:
            for name, count in target_counts(self.config, Batch.of(batch)).items():
                counts[LOSS_NAMES.index(name)] += float(count)
        ranks = 1
        if across_ranks and dist.is_initialized():
            counts = counts.to(self.logit_scale.device)
            dist.all_reduce(counts, group=data_parallel_group())
            ranks = dist.get_world_size(data_parallel_group())
        share = ranks * len(micro_batches)
        return {name: max(total, 1.0) / share for name, total in zip(LOSS_NAMES, counts.tolist())}

    @torch.no_grad()
    def contrastive_cache(self, micro_batches: Sequence[Batch | Mapping[str, torch.Tensor]]) -> ContrastiveCache | None:
        """The `ContrastiveCache` of one optimizer step: every micro-batch's contrastive embeddings as its
        training forward computes them (the unmasked views' CLS, no gradient) and its query rows (matched pairs),
        gathered over the data-parallel ranks (collective). None for batches without a contrastive term."""
        micro_batches = [Batch.of(b) for b in micro_batches]
        if not ForwardPlan.of(self.config, micro_batches[0]).contrastive:
            return None
        images, texts, rows = [], [], []
        for b in micro_batches:
            images.append(self.encode_image(b.pixel_values))
            texts.append(self.encode_text(b.input_ids, b.attention_mask))
            matched = matched_rows(b.itm_labels, fallback=False)
            rows.append(torch.ones(len(images[-1]), dtype=torch.bool) if matched is None else matched)
        return ContrastiveCache.gather(images, texts, [r.to(images[-1].device) for r in rows])

    def _image_text(
        self,
        b: Batch,
        plan: ForwardPlan,
        normalizers: Mapping[str, float] | None,
        cache: ContrastiveCache | None,
    ) -> FlavaOutput:
        cfg, out = self.config, FlavaOutput()
        row_mask = matched_rows(b.itm_labels, fallback=normalizers is None)  # MMM and contrastive: matched pairs
        normalizers = normalizers or {}
        padding = _padding_mask(b.attention_mask)
        image = text = None
        if plan.contrastive:  # unmasked views; the contrastive loss reads their CLS only (all when fusion shares)
            image = self.image_encoder(b.pixel_values, None, None if plan.shared_image else _cls_only(b.pixel_values))
            text = self.text_encoder(b.input_ids, padding, None if plan.shared_text else _cls_only(b.input_ids))
        if plan.fusion:
            image_masked = image if plan.shared_image else self.image_encoder(b.pixel_values, b.bool_masked_pos)
            text_masked = text if plan.shared_text else self.text_encoder(b.text_ids, padding)
            # targets over the fused sequence [CLS_M, CLS_I, P patches, L tokens]; MMM reads matched rows only
            P, L = image_masked[0].shape[1] - 1, text_masked[0].shape[1]
            mmm_image = mmm_text = None
            if "mmm_image" in plan.heads:
                mmm_image = F.pad(mim_targets(b.mim_labels, b.bool_masked_pos), (2, L), value=IGNORE_INDEX)
                mmm_image = rows_only(mmm_image, row_mask)
            if "mmm_text" in plan.heads:
                mmm_text = rows_only(F.pad(b.mlm_labels, (2 + P, 0), value=IGNORE_INDEX), row_mask)
            wanted = torch.zeros(b.text_ids.shape[0], 2 + P + L, dtype=torch.bool, device=b.text_ids.device)
            wanted[:, 0] = True  # CLS_M, read by ITM
            for targets in (mmm_image, mmm_text):
                if targets is not None:
                    wanted |= targets.ne(IGNORE_INDEX)
            index = positions_first(wanted)
            fused = self.multimodal_encoder(
                self.image_to_mm_projection(image_masked[0]),
                self.text_to_mm_projection(text_masked[0]),
                padding,
                index,
            )  # (B, Q, H)
            if "itm" in plan.heads:
                itm_logits = self.itm_head(fused[:, 0])
                out.logits["itm"] = itm_logits
                if b.itm_labels is not None:
                    itm = _reduced(
                        lambda r: F.cross_entropy(itm_logits, b.itm_labels, reduction=r), normalizers.get("itm")
                    )
                    out.losses["itm"] = itm * cfg.itm_weight
            if mmm_image is not None:
                mmm_image = mmm_image.gather(1, index)
                self._masked_prediction(
                    out, "mmm_image", self.mmm_image_head, fused, mmm_image, cfg.mmm_image_weight, normalizers
                )
            if mmm_text is not None:
                mmm_text = mmm_text.gather(1, index)
                self._masked_prediction(
                    out, "mmm_text", self.mmm_text_head, fused, mmm_text, cfg.mmm_text_weight, normalizers
                )

        if plan.contrastive:
            out.image_embedding = self._embed(self.image_projection, image[1])
            out.text_embedding = self._embed(self.text_projection, text[1])
            loss, per_image, per_text = self.contrastive(
                out.image_embedding,
                out.text_embedding,
                self.logit_scale,
                row_mask,
                normalizers.get("global_contrastive"),
                cache,
            )
            out.losses["global_contrastive"] = loss * cfg.global_contrastive_weight
            out.logits["contrastive_per_image"], out.logits["contrastive_per_text"] = per_image, per_text
        return self._finish(out)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> L2-normalised contrastive embeddings (B, projection_dim), for retrieval/zero-shot."""
        return self._embed(self.image_projection, self.image_encoder(pixel_values, None, _cls_only(pixel_values))[1])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) -> L2-normalised contrastive embeddings (B, projection_dim)."""
        normed = self.text_encoder(input_ids, _padding_mask(attention_mask), _cls_only(input_ids))[1]
        return self._embed(self.text_projection, normed)

    @staticmethod
    def _embed(projection: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        return F.normalize(projection(normed[:, 0]), dim=-1)  # the post-LN CLS state

    @staticmethod
    def _masked_prediction(
        out: FlavaOutput,
        name: str,
        head: nn.Module,
        states: torch.Tensor,
        labels: torch.Tensor,
        weight: float,
        normalizers: Mapping[str, float],
    ) -> None:
        """Run `head` only on positions with a target; states (B, N, H), labels (B, N)."""
        selected = labels.ne(IGNORE_INDEX)
        logits = head(states[selected])  # (num_selected, vocab), or this TP rank's classes for a vocab-parallel head
        out.logits[name] = logits
        if logits.shape[0] == 0:  # nothing masked: a zero that still touches the graph, never NaN
            out.losses[name] = logits.sum() * 0.0
        else:
            loss = _reduced(lambda r: head.loss(logits, labels[selected], r), normalizers.get(name))
            out.losses[name] = loss * weight

    @staticmethod
    def _finish(out: FlavaOutput) -> FlavaOutput:
        if out.losses:
            out.loss = torch.stack(list(out.losses.values())).sum()
        return out


def _padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if attention_mask is None else attention_mask.bool()


def _target_positions(targets: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) targets -> the positions_first index of those with a target; None (all positions) without targets."""
    return None if targets is None else positions_first(targets.ne(IGNORE_INDEX))


def _cls_only(batch: torch.Tensor) -> torch.Tensor:
    """The index (B, 1) of position 0: an encoder pass whose reader is the CLS state alone."""
    return torch.zeros(batch.shape[0], 1, dtype=torch.long, device=batch.device)


def _reduced(loss: Callable[[str], torch.Tensor], normalizer: float | None) -> torch.Tensor:
    """`loss(reduction)` as the mean over its rows, or, given a normalizer, as their sum divided by it."""
    return loss("mean") if normalizer is None else loss("sum") / normalizer
