"""InternVL3: InternViT -> projector -> splice into Qwen2 embeddings -> Qwen2 decoder -> loss.

Module names follow the reference system's checkpoints (`image_encoder.encoder`, `image_encoder.projector`,
`text_decoder`), so its converted checkpoints load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from mindspeed_mm.config.model_spec import InternVLSpec
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.config.transformer_configs import text_transformer_config, vision_transformer_config
from mindspeed_mm.models.internvl.projector import InternVLProjector
from mindspeed_mm.models.internvl.specs import block_spec, llm_layer_spec, vit_layer_spec
from mindspeed_mm.models.internvl.vision import InternViT

IGNORE_INDEX = -100


class ImageTokenMismatch(ValueError):
    """The number of <IMG_CONTEXT> tokens differs from the number of image features."""


class VisionModel(MegatronModule):
    def __init__(self, spec: InternVLSpec, vision_config: TransformerConfig, text_config: TransformerConfig):
        super().__init__(config=vision_config)
        v = spec.vision
        layer = vit_layer_spec(qk_norm=v.qk_layernorm, qkv_bias=v.add_qkv_bias, drop_path_rate=v.drop_path_rate,
                               layer_scale_init=v.initializer_factor)
        self.encoder = InternViT(vision_config, block_spec(layer, v.num_layers, final_norm=False),
                                 v.image_size, v.patch_size, v.num_channels, spec.downsample_ratio)
        in_features = int(v.hidden_size / (spec.downsample_ratio ** 2))
        self.projector = InternVLProjector(text_config, in_features)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[tiles, 3, H, W] -> [tiles, tokens_per_tile, llm_hidden]."""
        return self.projector(self.encoder(pixel_values))


@dataclass
class ShiftedLabels:
    targets: Tensor  # [b, s]: the next token, 0 where ignored (a valid index for the vocab-parallel CE)
    loss_mask: Tensor  # [b, s] float: 1 where the next token is a target


def shift_labels(labels: Tensor) -> ShiftedLabels:
    """Position t predicts labels[t+1]; the last position and ignored labels carry no loss."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return ShiftedLabels(torch.where(mask, targets, torch.zeros_like(targets)), mask.float())


class InternVLModel(MegatronModule):
    def __init__(self, spec: InternVLSpec, parallel: ParallelSizes | None = None):
        text_config = text_transformer_config(spec, parallel)
        super().__init__(config=text_config)
        self.spec = spec
        self.img_context_token_id = spec.img_context_token_id
        vision_config = vision_transformer_config(spec, parallel)
        self.image_encoder = VisionModel(spec, vision_config, text_config)
        t = spec.text
        self.text_decoder = GPTModel(
            config=text_config,
            transformer_layer_spec=block_spec(llm_layer_spec(), t.num_layers, final_norm=True),
            vocab_size=t.vocab_size,
            max_sequence_length=t.max_position_embeddings,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_percent=t.rotary_percent,
            rotary_base=t.rotary_base,
            # Image features are spliced into the full sequence first; the SP scatter comes after.
            scatter_embedding_sequence_parallel=False,
        )
        self._apply_freeze()

    def _apply_freeze(self) -> None:
        for module, frozen in ((self.image_encoder.encoder, self.spec.vision.freeze),
                               (self.image_encoder.projector, self.spec.projector.freeze),
                               (self.text_decoder, self.spec.text.freeze)):
            for p in module.parameters():
                p.requires_grad_(not frozen)

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None,
              image_flags: Tensor | None = None) -> Tensor:
        """Token embeddings with image features written over the <IMG_CONTEXT> positions: [s, b, h]."""
        embeds = self.text_decoder.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        is_image = input_ids == self.img_context_token_id  # [b, s]
        n_slots = int(is_image.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ImageTokenMismatch(f"{n_slots} <IMG_CONTEXT> tokens but no pixel_values")
            return embeds
        if image_flags is not None:
            pixel_values = pixel_values[image_flags.view(-1) != 0]
        features = self.image_encoder(pixel_values)  # [tiles, tokens, h]
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        if features.shape[0] != n_slots:
            raise ImageTokenMismatch(
                f"{n_slots} <IMG_CONTEXT> tokens but {features.shape[0]} image features "
                f"({pixel_values.shape[0]} tiles)")
        # HF fills the slots row-major over (batch, sequence): do the same on the [b, s, h] view.
        embeds = embeds.transpose(0, 1).clone()
        embeds[is_image] = features
        return embeds.transpose(0, 1).contiguous()

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, labels: Tensor | None = None,
                image_flags: Tensor | None = None) -> Tensor:
        """Logits [b, s, vocab/tp] without labels; with labels, the masked per-token loss [b, s]
        (0 where no target: divide its sum by `shift_labels(labels).loss_mask.sum()` for the mean)."""
        decoder_input = self.embed(input_ids, pixel_values, image_flags)
        if labels is None:
            return self.text_decoder(input_ids=input_ids, position_ids=None, attention_mask=None,
                                     decoder_input=decoder_input)
        shifted = shift_labels(labels)
        loss = self.text_decoder(input_ids=input_ids, position_ids=None, attention_mask=None,
                                 decoder_input=decoder_input, labels=shifted.targets)
        return loss * shifted.loss_mask


def mean_loss(per_token_loss: Tensor, labels: Tensor) -> Tensor:
    """Mean over target tokens, as transformers' causal-LM loss computes it."""
    return per_token_loss.sum() / shift_labels(labels).loss_mask.sum().clamp(min=1)


def load_full_state_dict(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Load an unsharded (TP1, PP1) state dict, naming every missing or unexpected tensor."""
    own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
