"""The frozen dVAE codebook encoder (DALL-E encoder as used by FLAVA) that turns images into MIM targets.

It runs offline in preprocessing: the token grid is stored in the shards, so training never runs it.
Module names follow `transformers.FlavaImageCodebook` so its checkpoints load key for key.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flava_ds.dataclass_config import build
from flava_ds.model.hf_io import CheckpointError, expect_keys, read_config, read_state_dict, write_checkpoint


@dataclass
class CodebookConfig:
    """The dVAE's shape; field names follow transformers' `FlavaImageCodebookConfig`, so its config.json loads."""

    hidden_size: int = 256  # the first group's width; each later group doubles it
    num_groups: int = 4  # all but the last halve the grid: 224 px -> 28 x 28 tokens for 4 groups
    num_blocks_per_group: int = 2
    vocab_size: int = 8192  # the codes: the model's image.codebook_vocab_size must match
    input_channels: int = 3

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CodebookConfig:
        """A named preset with overrides, each checked like the model config's (`build`)."""
        presets = {"dalle": {}, "tiny": {"hidden_size": 8, "num_blocks_per_group": 1, "vocab_size": 64}}
        if name not in presets:
            raise ValueError(f"unknown codebook preset {name!r}; choose one of {sorted(presets)}")
        return build(cls, {**presets[name], **overrides}, "codebook")


class _ResPath(nn.Module):
    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        hid = out_size // 4
        self.path = nn.Sequential(
            OrderedDict(
                relu_1=nn.ReLU(),
                conv_1=nn.Conv2d(in_size, hid, 3, padding=1),
                relu_2=nn.ReLU(),
                conv_2=nn.Conv2d(hid, hid, 3, padding=1),
                relu_3=nn.ReLU(),
                conv_3=nn.Conv2d(hid, hid, 3, padding=1),
                relu_4=nn.ReLU(),
                conv_4=nn.Conv2d(hid, out_size, 1),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.path(x)


class _Block(nn.Module):
    def __init__(self, in_size: int, out_size: int, num_layers: int):
        super().__init__()
        self.post_gain = 1 / num_layers**2  # DALL-E's residual gain, 1/64 for 4 groups x 2 blocks
        self.id_path = nn.Conv2d(in_size, out_size, 1) if in_size != out_size else nn.Identity()
        self.res_path = _ResPath(in_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class _Group(nn.Module):
    def __init__(self, num_blocks: int, num_layers: int, in_size: int, out_size: int, pool: bool):
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(num_blocks):
            blocks[f"block_{i + 1}"] = _Block(in_size if i == 0 else out_size, out_size, num_layers)
        if pool:
            blocks["pool"] = nn.MaxPool2d(kernel_size=2)
        self.group = nn.Sequential(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group(x)


class FlavaCodebook(nn.Module):
    """pixels (B, 3, H, W) in [0, 1] -> token ids (B, H/8, W/8) in [0, vocab_size)."""

    def __init__(self, config: CodebookConfig):
        super().__init__()
        self.config = config
        c = config
        num_layers = c.num_groups * c.num_blocks_per_group
        widths = [c.hidden_size * 2**i for i in range(c.num_groups)]
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=nn.Conv2d(c.input_channels, widths[0], 7, padding=3))
        for g in range(c.num_groups):
            in_w = widths[max(g - 1, 0)]
            blocks[f"group_{g + 1}"] = _Group(
                c.num_blocks_per_group, num_layers, in_w, widths[g], pool=g < c.num_groups - 1
            )
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(widths[-1], c.vocab_size, 1)))
        self.blocks = nn.Sequential(blocks)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def random(cls, seed: int, config: CodebookConfig | None = None) -> FlavaCodebook:
        """A seeded random codebook for tests and the demo (deterministic across machines)."""
        generator = torch.Generator().manual_seed(seed)
        model = cls(config or CodebookConfig())
        for p in model.parameters():  # fan-in scaled so activations keep their scale and tokens vary
            std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=generator) * std)
        return model

    @property
    def fingerprint(self) -> str:
        """A short content hash that identifies these weights in preprocessing manifests."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    @torch.no_grad()
    def get_codebook_indices(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels in [0, 1]; applies DALL-E's x*0.8+0.1 mapping itself."""
        if pixels.dim() != 4 or pixels.shape[1] != self.config.input_channels:
            raise ValueError(
                f"pixels: expected shape (batch, {self.config.input_channels}, height, width), "
                f"got {tuple(pixels.shape)}"
            )
        logits = self.blocks(pixels.to(self.blocks.input.weight.dtype) * 0.8 + 0.1)
        return logits.argmax(dim=1)

    # ---- transformers interop -------------------------------------------------------------------
    def to_hf_config(self) -> dict:
        return {
            **asdict(self.config),
            "model_type": "flava_image_codebook",
            "architectures": ["FlavaImageCodebook"],
            "freeze": True,
            "initializer_range": 0.02,
        }

    @classmethod
    def from_hf_pretrained(cls, directory: str | Path) -> FlavaCodebook:
        raw = read_config(directory)
        if raw.get("model_type") not in (None, "flava_image_codebook"):
            raise CheckpointError(
                f"{Path(directory) / 'config.json'}: model_type={raw.get('model_type')!r}, "
                "expected 'flava_image_codebook'"
            )
        known = {f.name for f in fields(CodebookConfig)}
        config = CodebookConfig(**{k: raw[k] for k in known if k in raw})
        model = cls(config)
        state = read_state_dict(directory)
        expect_keys(str(directory), set(state), set(model.state_dict()))
        for name, tensor in model.state_dict().items():
            if state[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{directory}: key {name!r} has shape {tuple(state[name].shape)}, "
                    f"config.json implies {tuple(tensor.shape)}"
                )
        model.load_state_dict(state)
        return model

    def save_hf_pretrained(self, directory: str | Path) -> None:
        write_checkpoint(directory, self.to_hf_config(), self.state_dict())


def load_codebook(spec: str) -> FlavaCodebook:
    """`random:SEED[:tiny]` or a `FlavaImageCodebook` directory — the form preprocessing flags take."""
    if spec.startswith("random:"):
        parts = spec.split(":")
        config = CodebookConfig.preset(parts[2]) if len(parts) > 2 else CodebookConfig()
        return FlavaCodebook.random(int(parts[1]), config)
    return FlavaCodebook.from_hf_pretrained(spec)
