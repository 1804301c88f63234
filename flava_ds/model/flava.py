"""FlavaForPreTraining: the three encoders, heads and losses of docs/DESIGN.md §3 for the three batch kinds.

The batch kind follows from the inputs, as in `transformers`:
  image-only  (pixel_values, bool_masked_pos, mim_labels)               -> MIM
  text-only   (input_ids[_masked], attention_mask, mlm_labels)           -> MLM
  image-text  (both, plus itm_labels)  -> global contrastive, ITM, MMM-image, MMM-text
Only what the batch kind needs is computed: image-only batches never run an unmasked image pass, a
contrastive-only model never runs the multimodal encoder, and heads only see masked positions. `ForwardPlan`
decides which passes and heads run; `flava_ds.train.flops` counts the same plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flava_ds.model.config import FlavaConfig, merge_overrides, validate_for_tensor_parallel
from flava_ds.model.contrastive import ContrastiveCache, GlobalContrastiveLoss
from flava_ds.model.encoders import ImageEncoder, MultimodalEncoder, TextEncoder
from flava_ds.model.heads import ITMHead, MaskedPredictionHead
from flava_ds.model.hf_io import expect_keys, read_config, read_state_dict, write_checkpoint
from flava_ds.model.transformer import positions_first
from flava_ds.parallel import sharding
from flava_ds.parallel.layers import TensorParallelLinearMixin
from flava_ds.parallel.state import data_parallel_group, is_global_rank_zero, tensor_parallel_size

IGNORE_INDEX = -100
NATIVE_FORMAT = "flava_ds"
LOSS_NAMES = ("mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text")


@dataclass
class FlavaOutput:
    loss: torch.Tensor | None = None  # weighted sum of the terms present
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted terms, keys from LOSS_NAMES
    image_embedding: torch.Tensor | None = None  # (B, projection_dim), L2-normalised (contrastive)
    text_embedding: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # mim, mlm, itm, mmm_*, contrastive_*


@dataclass
class PretrainingBatch:
    """`forward`'s arguments, kept together on their way through the batch kinds' code paths."""

    input_ids: torch.Tensor | None
    input_ids_masked: torch.Tensor | None
    attention_mask: torch.Tensor | None
    pixel_values: torch.Tensor | None
    bool_masked_pos: torch.Tensor | None
    mim_labels: torch.Tensor | None
    mlm_labels: torch.Tensor | None
    itm_labels: torch.Tensor | None

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, torch.Tensor]) -> PretrainingBatch:
        """From `forward`'s keyword arguments (a loader batch); absent ones are None."""
        return cls(**{f.name: inputs.get(f.name) for f in fields(cls)})

    @property
    def has_text(self) -> bool:
        return self.input_ids is not None or self.input_ids_masked is not None

    @property
    def kind(self) -> str:
        """The batch kind the inputs make, as in `transformers`: 'image_text', 'image' or 'text'."""
        if self.pixel_values is not None:
            return "image_text" if self.has_text else "image"
        return "text"

    @property
    def text_ids(self) -> torch.Tensor | None:
        """The ids the masked-modelling text pass reads: the masked ones when given."""
        return self.input_ids_masked if self.input_ids_masked is not None else self.input_ids


# Per head: the batch kind it runs in and the input it reads (None: ITM's logits need no labels).
_HEAD_INPUTS = {
    "mim": ("image", "mim_labels"),
    "mlm": ("text", "mlm_labels"),
    "itm": ("image_text", None),
    "global_contrastive": ("image_text", "input_ids"),
    "mmm_image": ("image_text", "mim_labels"),
    "mmm_text": ("image_text", "mlm_labels"),
}
FUSION_HEADS = frozenset({"itm", "mmm_image", "mmm_text"})


@dataclass(frozen=True)
class ForwardPlan:
    """Which passes and heads one forward runs, decided from the config and the inputs given. The forward paths
    follow it and `flava_ds.train.flops.batch_flops` counts it, so the model FLOPs behind MFU are those of the
    work that runs: a head runs for a loss of weight > 0 whose input is given, a pass only when a running head
    reads it (FLAVA_C, contrastive only, runs no masked view and no fusion)."""

    kind: str  # 'image_text', 'image' or 'text'
    heads: frozenset[str]  # the LOSS_NAMES whose heads run; 'global_contrastive': the unmasked views' projections
    shared_image: bool  # image-text: one unmasked image pass feeds contrastive and fusion (no mask was given)
    shared_text: bool  # image-text: one text pass feeds both (no masked ids were given)

    @classmethod
    def of(cls, config: FlavaConfig, b: PretrainingBatch) -> ForwardPlan:
        kind = b.kind
        heads = frozenset(
            name
            for name, (head_kind, needs) in _HEAD_INPUTS.items()
            if head_kind == kind
            and getattr(config, f"{name}_weight") > 0
            and (needs is None or getattr(b, needs) is not None)
        )
        both = "global_contrastive" in heads and not heads.isdisjoint(FUSION_HEADS)
        return cls(kind, heads, both and b.bool_masked_pos is None, both and b.text_ids is b.input_ids)

    @property
    def contrastive(self) -> bool:
        """The unmasked views run; the contrastive loss reads their CLS only (all positions when shared)."""
        return "global_contrastive" in self.heads

    @property
    def fusion(self) -> bool:
        """The masked views (or the shared unmasked ones) and the multimodal encoder run."""
        return not self.heads.isdisjoint(FUSION_HEADS)


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
        input_ids: torch.Tensor | None = None,
        input_ids_masked: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        mim_labels: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        itm_labels: torch.Tensor | None = None,
        loss_normalizers: Mapping[str, float] | None = None,
        contrastive_cache: ContrastiveCache | None = None,
    ) -> FlavaOutput:
        """Shapes as in `transformers.FlavaForPreTraining.forward`:
        input_ids, input_ids_masked, attention_mask, mlm_labels: (B, L); pixel_values: (B, C, S, S);
        bool_masked_pos, mim_labels: (B, P) (codebook ids for all patches); itm_labels: (B,). Ignore index -100.

        `loss_normalizers` (keys from LOSS_NAMES): a term named there is its summed per-target losses divided by
        that number instead of their mean over this batch (see `target_counts`), so a trainer can make every
        term a mean over the global batch of a step; None or a name absent: this batch's mean, as `transformers`.
        With `loss_normalizers`, MMM and the contrastive rows are the matched pairs only, even when a batch has
        none (`transformers` then falls back to all rows, which would make the loss depend on how a global batch
        is cut). `contrastive_cache` (with `loss_normalizers`): the contrastive term scores against the columns of
        the step's whole global batch under accumulation (see `ContrastiveCache`).
        """
        batch = PretrainingBatch(
            input_ids,
            input_ids_masked,
            attention_mask,
            pixel_values,
            bool_masked_pos,
            mim_labels,
            mlm_labels,
            itm_labels,
        )
        self._check_inputs(batch)
        plan = ForwardPlan.of(self.config, batch)
        if plan.kind == "image_text":
            return self._image_text(batch, plan, loss_normalizers, contrastive_cache)
        paths = {"image": self._image_only, "text": self._text_only}
        return paths[plan.kind](batch, plan, loss_normalizers or {})

    def target_counts(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """How many targets each loss of this batch (`forward`'s arguments) averages over, as 0-dim tensors keyed
        by LOSS_NAMES: masked patches / tokens for MIM, MLM and MMM (MMM on matched pairs only), labelled pairs
        for ITM, query rows for the contrastive loss. Summed over a step's micro-batches and data-parallel ranks
        they give the global-batch normalisers of `forward`'s `loss_normalizers`."""
        b = PretrainingBatch.from_inputs(inputs)
        heads = ForwardPlan.of(self.config, b).heads
        rows = matched_rows(b.itm_labels, fallback=False)
        targets = {
            "mim": lambda: mim_targets(b.mim_labels, b.bool_masked_pos),
            "mlm": lambda: b.mlm_labels,
            "mmm_image": lambda: _rows(mim_targets(b.mim_labels, b.bool_masked_pos), rows),
            "mmm_text": lambda: _rows(b.mlm_labels, rows),
        }
        counts = {name: get().ne(IGNORE_INDEX).sum() for name, get in targets.items() if name in heads}
        if "itm" in heads and b.itm_labels is not None:
            counts["itm"] = torch.tensor(b.itm_labels.numel())
        if "global_contrastive" in heads:
            counts["global_contrastive"] = torch.tensor(b.input_ids.shape[0]) if rows is None else rows.sum()
        return counts

    def _image_only(self, b: PretrainingBatch, plan: ForwardPlan, normalizers: Mapping[str, float]) -> FlavaOutput:
        out, targets = FlavaOutput(), None
        if "mim" in plan.heads:
            targets = F.pad(mim_targets(b.mim_labels, b.bool_masked_pos), (1, 0), value=IGNORE_INDEX)  # (B, 1+P)
        index = _target_positions(targets)
        _, image = self.image_encoder(b.pixel_values, b.bool_masked_pos, index)
        if targets is not None:
            mim = targets.gather(1, index)
            self._masked_prediction(out, "mim", self.mim_head, image, mim, self.config.mim_weight, normalizers)
        return self._finish(out)

    def _text_only(self, b: PretrainingBatch, plan: ForwardPlan, normalizers: Mapping[str, float]) -> FlavaOutput:
        out = FlavaOutput()
        targets = b.mlm_labels if "mlm" in plan.heads else None
        index = _target_positions(targets)
        _, text = self.text_encoder(b.text_ids, _padding_mask(b.attention_mask), index)
        if targets is not None:
            mlm = targets.gather(1, index)
            self._masked_prediction(out, "mlm", self.mlm_head, text, mlm, self.config.mlm_weight, normalizers)
        return self._finish(out)

    def loss_normalizers(
        self, micro_batches: list[Mapping[str, torch.Tensor]], across_ranks: bool = False
    ) -> dict[str, float]:
        """`forward`'s `loss_normalizers` for one optimizer step: per loss term, the step's global target count
        (`target_counts` over these micro-batches, with `across_ranks` summed over the data-parallel ranks:
        collective) / (ranks x micro-batches). A trainer dividing each micro-step's loss by the number of
        micro-batches and averaging gradients over the ranks (as DeepSpeed does) then applies the gradient of (all
        per-target losses of the step) / (their global count): the same update whatever cut of the global batch
        the ranks and micro-steps make."""
        counts = torch.zeros(len(LOSS_NAMES), dtype=torch.float64)
        for inputs in micro_batches:
            for name, count in self.target_counts(inputs).items():
                counts[LOSS_NAMES.index(name)] += float(count)
        ranks = 1
        if across_ranks and dist.is_initialized():
            counts = counts.to(self.logit_scale.device)
            dist.all_reduce(counts, group=data_parallel_group())
            ranks = dist.get_world_size(data_parallel_group())
        share = ranks * len(micro_batches)
        return {name: max(total, 1.0) / share for name, total in zip(LOSS_NAMES, counts.tolist())}

    @torch.no_grad()
    def contrastive_cache(self, micro_batches: list[Mapping[str, torch.Tensor]]) -> ContrastiveCache | None:
        """The `ContrastiveCache` of one optimizer step: every micro-batch's contrastive embeddings as its
        training forward computes them (the unmasked views' CLS, no gradient) and its query rows (matched pairs),
        gathered over the data-parallel ranks (collective). None for batches without a contrastive term."""
        if not ForwardPlan.of(self.config, PretrainingBatch.from_inputs(micro_batches[0])).contrastive:
            return None
        images, texts, rows = [], [], []
        for inputs in micro_batches:
            b = PretrainingBatch.from_inputs(inputs)
            images.append(self.encode_image(b.pixel_values))
            texts.append(self.encode_text(b.input_ids, b.attention_mask))
            matched = matched_rows(b.itm_labels, fallback=False)
            rows.append(torch.ones(len(images[-1]), dtype=torch.bool) if matched is None else matched)
        return ContrastiveCache.gather(images, texts, [r.to(images[-1].device) for r in rows])

    def _image_text(
        self,
        b: PretrainingBatch,
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
                mmm_image = _rows(mmm_image, row_mask)
            if "mmm_text" in plan.heads:
                mmm_text = _rows(F.pad(b.mlm_labels, (2 + P, 0), value=IGNORE_INDEX), row_mask)
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

    def _check_inputs(self, b: PretrainingBatch) -> None:
        """Missing or wrongly shaped arguments raise ValueError naming the argument and the expected shape."""
        img = self.config.image
        if b.pixel_values is None and not b.has_text:
            raise ValueError("FlavaForPreTraining.forward: pass pixel_values (B, C, H, W) and/or input_ids (B, L)")
        B = (b.pixel_values if b.pixel_values is not None else b.text_ids).shape[0]  # B from images, else text
        P = img.num_patches
        if b.pixel_values is not None:
            _expect("pixel_values", b.pixel_values, (B, img.num_channels, img.image_size, img.image_size))
            _expect("bool_masked_pos", b.bool_masked_pos, (B, P))
            _expect("mim_labels", b.mim_labels, (B, P))
            if b.mim_labels is not None and b.bool_masked_pos is None:
                raise ValueError(f"mim_labels given without bool_masked_pos: pass bool_masked_pos of shape ({B}, {P})")
        if b.has_text:
            ref = b.input_ids if b.input_ids is not None else b.input_ids_masked
            if ref.dim() != 2:
                raise ValueError(f"input_ids: expected shape (batch, seq_len), got {tuple(ref.shape)}")
            L = ref.shape[1]
            if L > self.config.text.max_position_embeddings:
                raise ValueError(
                    f"input_ids: seq_len {L} exceeds "
                    f"text.max_position_embeddings={self.config.text.max_position_embeddings}"
                )
            for name in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels"):
                _expect(name, getattr(b, name), (B, L))
        else:
            for name in ("attention_mask", "mlm_labels", "itm_labels"):
                if getattr(b, name) is not None:
                    raise ValueError(f"{name} given without input_ids: pass input_ids of shape (batch, seq_len)")
        _expect("itm_labels", b.itm_labels, (B,))
        if (
            b.pixel_values is not None
            and b.has_text
            and self.config.global_contrastive_weight > 0
            and b.input_ids is None
        ):
            raise ValueError(f"image-text batch: the contrastive loss needs the unmasked input_ids of shape ({B}, L)")


def _expect(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if tensor is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")


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


def _rows(targets: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """Targets of the rows outside `row_mask` (B,) set to the ignore index."""
    return targets if row_mask is None else targets.masked_fill(~row_mask[:, None], IGNORE_INDEX)


def matched_rows(itm_labels: torch.Tensor | None, fallback: bool = True) -> torch.Tensor | None:
    """The rows (B,) whose pair is matched, which MMM and the contrastive loss read; with `fallback` all rows
    when none is (as `transformers`)."""
    if itm_labels is None:
        return None
    matched = itm_labels.ne(0)
    return matched | ~matched.any() if fallback else matched


def mim_targets(mim_labels: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """Codebook ids at masked patches, ignore index elsewhere (never modifies the caller's tensor)."""
    return mim_labels.masked_fill(~bool_masked_pos.bool(), IGNORE_INDEX)
