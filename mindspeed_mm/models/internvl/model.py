"""InternVL3: InternViT -> projector -> splice into the LLM's embeddings -> LLM decoder -> loss.

One `InternVLModel` is one pipeline stage (or one virtual-pipeline chunk) of a `LayoutPlan`; without a
plan it is the whole model on one stage. Module names follow the reference system's checkpoints
(`image_encoder.encoder`, `image_encoder.projector`, `text_decoder`), so its checkpoints load unchanged.

Exactly one tensor crosses each stage boundary: ViT hidden states, image features (projector output,
when the LLM starts on the next stage) or LLM hidden states. Every stage reads the whole micro-batch.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from mindspeed_mm.config.model_spec import IGNORE_INDEX, InternVLSpec
from mindspeed_mm.config.parallel import ParallelSizes
from mindspeed_mm.config.transformer_configs import text_transformer_config, vision_transformer_config
from mindspeed_mm.models.internvl.params import lookup, trainable
from mindspeed_mm.models.internvl.projector import InternVLProjector
from mindspeed_mm.models.internvl.moe import MoERecorder, Qwen3MoeRouter, StageCarrier, pipeline_group
from mindspeed_mm.models.internvl.sharding import ExpertShard, global_name, shard_tensor
from mindspeed_mm.models.internvl.rope import LLMDecoder
from mindspeed_mm.models.internvl.specs import block_spec, llm_layer_spec, vit_layer_spec
from mindspeed_mm.models.internvl.vision import InternViT, input_for_full_recompute
from mindspeed_mm.models.lora import kaiming_uniform_like_peft
from mindspeed_mm.parallel.layout import LayoutPlan, StagePlan, plan_layout



class ImageTokenMismatch(ValueError):
    """The number of <IMG_CONTEXT> tokens differs from the number of image features."""


class VisionModel(MegatronModule):
    def __init__(self, spec: InternVLSpec, stage: StagePlan, vision_config: TransformerConfig,
                 text_config: TransformerConfig, vp_stage: int | None = None):
        super().__init__(config=vision_config)
        v = spec.vision
        layer = vit_layer_spec(qk_norm=v.qk_layernorm, qkv_bias=v.add_qkv_bias, drop_path_rate=v.drop_path_rate,
                               layer_scale_init=v.initializer_factor, lora=v.lora)
        self.encoder = InternViT(vision_config, block_spec(layer, len(stage.vit_layers), final_norm=False),
                                 v.image_size, v.patch_size, v.num_channels, spec.downsample_ratio,
                                 first=stage.has_vit_embed, last=stage.has_projector, vp_stage=vp_stage)
        _renumber(self.encoder.encoder, stage.vit_layers.start)
        self.projector = (InternVLProjector(text_config, spec.projector.input_size)
                          if stage.has_projector else None)

    def forward(self, pixel_values: Tensor | None) -> Tensor:
        """Tiles [n, 3, H, W] (or the previous stage's hidden states) -> hidden states, or on the ViT's last
        stage image features [n, tokens_per_tile, llm_hidden]."""
        x = self.encoder(pixel_values)
        return self.projector(x) if self.projector is not None else x


def _renumber(block, offset: int) -> None:
    """Layer numbers are global (drop-path schedule, checkpoint keys); megatron's own offset assumes an
    even pipeline split, ours need not be one."""
    if block is not None:
        for i, layer in enumerate(block.layers):
            layer.layer_number = offset + i + 1
            if hasattr(layer.mlp, "set_layer_number"):  # the router's: which sparse layer it records
                layer.mlp.set_layer_number(layer.layer_number)


@dataclass
class ShiftedLabels:
    targets: Tensor  # [b, s]: the next token, 0 where ignored (a valid index for the vocab-parallel CE)
    loss_mask: Tensor  # [b, s] float: 1 where the next token is a target


def shift_labels(labels: Tensor, sample_ids: Tensor | None = None) -> ShiftedLabels:
    """Position t predicts labels[t+1]; the last position and ignored labels carry no loss. In a pack
    (`sample_ids` [b, s], -1 on padding) the last token of a sample predicts nothing either: the next token is
    another sample's."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if sample_ids is not None:
        sample_ids = sample_ids.to(labels.device)
        same = torch.zeros_like(mask)
        same[:, :-1] = (sample_ids[:, 1:] == sample_ids[:, :-1]) & (sample_ids[:, :-1] >= 0)
        mask = mask & same
    return ShiftedLabels(torch.where(mask, targets, torch.zeros_like(targets)), mask.float())


def num_target_tokens(labels: Tensor, sample_ids: Tensor | None = None) -> Tensor:
    return shift_labels(labels, sample_ids).loss_mask.sum()


def mean_loss(per_token_loss: Tensor, labels: Tensor, sample_ids: Tensor | None = None) -> Tensor:
    """Mean over the target tokens of `labels` (the whole micro-batch, before any CP split), as
    transformers' causal-LM loss computes it. Under CP each rank's share sums to the mean."""
    return per_token_loss.sum() / num_target_tokens(labels, sample_ids).clamp(min=1)


class PackError(ValueError):
    """`sample_ids` that do not describe a pack: samples must be contiguous runs, numbered from 0, padding last."""


def pack_positions(sample_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(position within its sample, its sample's token count) of every token of a packed micro-batch, [b, s] each.
    Padding (-1) counts as one more run at the end (its positions are never seen by a real token)."""
    b, s = sample_ids.shape
    start = torch.ones_like(sample_ids, dtype=torch.bool)
    start[:, 1:] = sample_ids[:, 1:] != sample_ids[:, :-1]
    # samples are contiguous and in order: 0, 1, ..., n-1, then padding
    nxt = sample_ids[:, 1:][start[:, 1:]]
    prev = sample_ids[:, :-1][start[:, 1:]]
    if bool(((sample_ids[:, 0] != 0) & (sample_ids[:, 0] != -1)).any()) or bool(
            ((nxt != prev + 1) & (nxt != -1)).any() or (prev == -1).any()):
        raise PackError("sample_ids must number each row's samples 0, 1, ... in contiguous runs, padding (-1) last")
    idx = torch.arange(s, device=sample_ids.device).expand(b, s)
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    run = start.long().cumsum(dim=1) - 1  # run index within the row
    counts = torch.zeros(b, s, dtype=torch.long, device=sample_ids.device).scatter_add_(
        1, run, torch.ones_like(run))
    return idx - first, counts.gather(1, run)


def single_stage_plan(spec: InternVLSpec, parallel: ParallelSizes) -> LayoutPlan:
    return plan_layout(spec, parallel, vit_pp_layers=[[spec.vision.num_layers]],
                       llm_pp_layers=[[spec.text.num_layers]])


class InternVLModel(MegatronModule):
    def __init__(self, spec: InternVLSpec, parallel: ParallelSizes | None = None,
                 plan: LayoutPlan | None = None, stage: StagePlan | None = None,
                 cp_algo: str = "megatron_cp_algo", seed: int = 1234):
        parallel = plan.parallel if plan is not None else (parallel or ParallelSizes())
        plan = plan or single_stage_plan(spec, parallel)
        stage = stage or plan.stages[0]
        # Stage boundaries carry tensors of different shapes (ViT tiles, image features, LLM tokens).
        text_config = text_transformer_config(spec, parallel, variable_seq_lengths=parallel.pp > 1)
        super().__init__(config=text_config)
        self.spec, self.plan, self.stage, self.parallel = spec, plan, stage, parallel
        self.vp_stage = stage.stage // parallel.pp if plan.vpp else None
        self.img_context_token_id = spec.img_context_token_id
        self.image_encoder = (VisionModel(spec, stage, vision_transformer_config(spec, parallel), text_config,
                                          self.vp_stage) if stage.has_vit else None)
        self.text_decoder = None
        if stage.has_llm:
            t = spec.text
            self.text_decoder = LLMDecoder(
                config=text_config,
                rope_scaling=t.rope_scaling,
                transformer_layer_spec=block_spec(
                    [llm_layer_spec(parallel.cp, cp_algo, t.qk_layernorm, t.lora, moe=t.is_moe_layer(i))
                     for i in stage.llm_layers], len(stage.llm_layers), final_norm=True),
                vocab_size=plan.padded_vocab_size,
                max_sequence_length=t.max_position_embeddings,
                pre_process=stage.has_llm_embed,
                post_process=stage.has_llm_head,
                share_embeddings_and_output_weights=t.tied,
                position_embedding_type="rope",
                rotary_percent=t.rotary_percent,
                rotary_base=t.rotary_base,
                # Image features are spliced into the full sequence first; CP and SP split it after.
                scatter_embedding_sequence_parallel=False,
                vp_stage=self.vp_stage,
            )
            _renumber(self.text_decoder.decoder, stage.llm_layers.start)
        self.experts = ExpertShard.of(spec.text.num_experts, parallel.ep,
                                      parallel_state.get_expert_model_parallel_rank() if parallel.ep > 1 else 0)
        self.moe_recorder = self._moe_recorder() if stage.has_llm and spec.text.moe else None
        self.input_tensor = None
        # megatron's finalize_model_grads finds the model under DDP by `pre_process` and sums the embedding
        # grads of the chunks it takes for the first and last stage by pipeline position (model[0] on the first
        # rank, model[-1] on the last) when they are shared. Ours are shared only with tied embeddings, between
        # the LLM's first and last stage, which may be a later rank or chunk (the ViT comes first): megatron's
        # must find nothing to sum, `training.pipeline.finalize_model_grads` sums `tied_embedding_copy()`.
        self.pre_process, self.post_process = stage.stage == 0, stage.has_llm_head
        self.share_embeddings_and_output_weights = False
        self.model_type = ModelType.encoder_or_decoder  # one tensor per boundary, as megatron's GPT
        self._init_adapters(seed)
        self._apply_freeze()

    def _moe_recorder(self) -> MoERecorder:
        carrier = None
        if self.parallel.pp > 1:
            group, ranks = pipeline_group()
            carrier = StageCarrier(self.spec, self.plan, self.stage, group, ranks)
        recorder = MoERecorder(self.spec, self.stage, self.parallel, carrier)
        for m in self.modules():
            if isinstance(m, Qwen3MoeRouter):
                m.recorder = recorder
        return recorder

    def tied_embedding_copy(self) -> torch.nn.Parameter | None:
        """This chunk's copy of tied embeddings held on two stages (`LayoutPlan.tied_embedding_pp_ranks`): the
        LLM's first stage's token embeddings or the last stage's output layer; None otherwise."""
        if self.text_decoder is None or not any(s.has_tied_output for s in self.plan.stages):
            return None
        if self.stage.has_llm_embed or self.stage.has_tied_output:
            return self.text_decoder.shared_embedding_or_output_weight()
        return None

    def global_names(self):
        """(name in the full model, parameter) for every parameter of this chunk."""
        for local, p in self.named_parameters():
            yield global_name(local, self.stage, self.experts), p

    def _init_adapters(self, seed: int) -> None:
        """LoRA's A drawn for the full matrix from a generator keyed by `seed` and its name, then cut for this rank
        (B starts at zero): every layout starts from the same adapters."""
        tp, rank = self.parallel.tp, parallel_state.get_tensor_model_parallel_rank() if self.parallel.tp > 1 else 0
        with torch.no_grad():
            for name, p in self.global_names():
                d, _ = lookup(name)
                if not d.adapter or ".lora_a" not in name:
                    continue
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                full = kaiming_uniform_like_peft(tuple(d.shape(self.spec)), g)
                p.copy_(shard_tensor(name, full, self.spec, tp, rank, self.plan.padded_vocab_size,
                                     etp=self.parallel.expert_tp))

    def _apply_freeze(self) -> None:
        for name, p in self.global_names():
            p.requires_grad_(trainable(self.spec, name))

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "one tensor crosses each stage boundary"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor
        if self.image_encoder is not None and not self.stage.has_vit_embed:
            self.image_encoder.encoder.set_input_tensor(input_tensor)
        if self.text_decoder is not None and not self.stage.has_llm_embed:
            self.text_decoder.set_input_tensor(input_tensor)

    # ------------------------------------------------------------------------------------------ pieces
    def _pad_multiple(self) -> int:
        p = self.parallel
        return (2 * p.cp if p.cp > 1 else 1) * (p.tp if p.sp else 1)

    def pad_batch(self, input_ids: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Right-pad the sequence so CP (2*cp zigzag chunks) and SP (tp slices) split it evenly; pads
        carry no loss and, being last, change no real token's causal attention."""
        pad = (-input_ids.shape[1]) % self._pad_multiple()
        if not pad:
            return input_ids, labels
        input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=0)
        if labels is not None:
            labels = torch.nn.functional.pad(labels, (0, pad), value=IGNORE_INDEX)
        return input_ids, labels

    def pad_sample_ids(self, sample_ids: Tensor) -> Tensor:
        """`sample_ids` padded as `pad_batch` pads the ids: -1, padding."""
        pad = (-sample_ids.shape[1]) % self._pad_multiple()
        return torch.nn.functional.pad(sample_ids, (0, pad), value=-1) if pad else sample_ids

    def splice(self, input_ids: Tensor, features: Tensor | None, dummy: bool) -> Tensor:
        """Token embeddings with image features written over the <IMG_CONTEXT> positions: [s, b, h]."""
        embeds = self.text_decoder.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        is_image = input_ids == self.img_context_token_id  # [b, s]
        n_slots = int(is_image.sum())
        if dummy:
            if n_slots:
                raise ImageTokenMismatch(f"{n_slots} <IMG_CONTEXT> tokens but no pixel_values")
            # A blank tile went through the ViT (see `_vision_input`): keep it in the graph at weight 0.
            return embeds + 0.0 * features.sum() if features is not None else embeds
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        if features.shape[0] != n_slots:
            tiles = features.shape[0] // self.spec.tokens_per_tile
            raise ImageTokenMismatch(f"{n_slots} <IMG_CONTEXT> tokens but {features.shape[0]} image features "
                                     f"({tiles} tiles)")
        # HF fills the slots row-major over (batch, sequence): do the same on the [b, s, h] view.
        embeds = embeds.transpose(0, 1).clone()
        embeds[is_image] = features
        return embeds.transpose(0, 1).contiguous()

    def _vision_input(self, pixel_values: Tensor | None, image_flags: Tensor | None) -> tuple[Tensor | None, bool]:
        """Tiles to encode, and whether they are a stand-in. A micro-batch without images still runs one
        blank tile through the ViT (its features are multiplied by 0), so every stage and every DP rank
        runs the same modules: no pipeline stage waits for a tensor that never comes, no gradient
        all-reduce waits for a rank that skipped the ViT."""
        if pixel_values is not None and image_flags is not None:
            pixel_values = pixel_values[image_flags.view(-1) != 0]
        if pixel_values is None or pixel_values.shape[0] == 0:
            v = self.spec.vision
            ref = next(self.parameters())
            return torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=ref.dtype, device=ref.device), True
        return pixel_values, False

    def _cp_split(self, t: Tensor, seq_dim: int, layout=None) -> Tensor:
        """This CP rank's part of `t`: the whole-sequence zigzag, or with a `PackedLayout` its split of every sample."""
        if self.parallel.cp == 1:
            return t
        rank = parallel_state.get_context_parallel_rank()
        if layout is not None:
            return layout.local(t, rank, seq_dim)
        from mindspeed_mm.parallel.context_parallel import zigzag_split
        return zigzag_split(t, self.parallel.cp, rank, seq_dim)

    def packed_cp_layout(self, sample_ids: Tensor):
        """The `PackedLayout` of a packed micro-batch under CP: each sample padded to a multiple of 2*cp and split in
        zigzag over the CP ranks (the whole padded length a multiple of 2*cp*tp under SP)."""
        from mindspeed_mm.parallel.context_parallel import PackedLayout
        p = self.parallel
        return PackedLayout(sample_ids, p.cp, multiple=p.tp if p.sp else 1)

    def _loss(self, logits: Tensor, labels: Tensor, sample_ids: Tensor | None = None, layout=None) -> Tensor:
        shifted = shift_labels(labels, sample_ids)
        targets = self._cp_split(shifted.targets, 1, layout)
        mask = self._cp_split(shifted.loss_mask, 1, layout)
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)
        return loss * mask

    def _mask_padded_vocab(self, logits: Tensor) -> Tensor:
        """Logits of the rows that pad the vocabulary to a multiple of TP never win and carry no loss."""
        local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        n_pad = start + local - self.spec.text.vocab_size
        if n_pad <= 0:
            return logits
        pad = torch.arange(local, device=logits.device) >= local - n_pad
        return logits.masked_fill(pad, float("-inf"))

    # ------------------------------------------------------------------------------------------ forward
    def _padding_mask(self, attention_mask: Tensor | None, sample_ids: Tensor | None, width: int,
                      layout) -> Tensor | None:
        """This rank's tokens that are not padding [b, s_local] (after the CP and SP splits), for the routers'
        statistics; None: every token counts (no mask given)."""
        if layout is not None:
            valid = layout.sample_ids >= 0
        elif sample_ids is not None:
            valid = sample_ids >= 0
        elif attention_mask is not None:
            valid = attention_mask.bool()
        else:
            return None
        valid = torch.nn.functional.pad(valid, (0, width - valid.shape[1]), value=False)
        valid = self._cp_split(valid, 1, layout)
        if self.parallel.sp:
            tp, rank = self.parallel.tp, parallel_state.get_tensor_model_parallel_rank()
            valid = valid.chunk(tp, dim=1)[rank]
        return valid.contiguous()

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, labels: Tensor | None = None,
                image_flags: Tensor | None = None, sample_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """On the last stage: logits [b, s_local, vocab/tp] without labels, or with labels the masked
        per-token loss [b, s_local] (0 where no target; `mean_loss(out, labels)` is the micro-batch mean).
        `s_local` is the padded sequence split over CP. Earlier stages return the boundary tensor.

        `sample_ids` [b, s] (a packed micro-batch: each row whole samples back to back, -1 on padding): attention
        stays inside each sample (block-diagonal causal) and RoPE restarts at 0 per sample; the last token of a
        sample has no target. The sample ids reach core attention as its `attention_mask` (an integer tensor over
        the full padded sequence; `SDPAttention` and `ContextParallelAttention` build each block's mask from it).
        Under CP a pack is split sample by sample (`PackedLayout`): each sample is padded at its end to a multiple of
        2*cp tokens (id 0, no target, the sample's id) and every CP rank holds chunks r and 2cp-1-r of every sample;
        core attention then takes `PackedLayout.attention_mask` (ids and positions of every rank's tokens).
        Without them the micro-batch runs exactly as before.

        `attention_mask` [b, s] (True on real tokens; the collate's): only a sparse LLM reads it, so that padding
        counts for nothing in the load-balancing loss and the expert load, as in transformers."""
        stage = self.stage
        seq_len = input_ids.shape[1]
        padding, attention_mask = attention_mask, None  # core attention's mask is built from sample_ids below
        packed_rope = layout = cp_index = None
        if sample_ids is not None and self.parallel.cp > 1:
            sample_ids = sample_ids.to(input_ids.device)
            pack_positions(sample_ids)  # checks the pack
            layout = self.packed_cp_layout(sample_ids)
            input_ids = layout.pad(input_ids, 0)
            labels = layout.pad(labels, IGNORE_INDEX) if labels is not None else None
            sample_ids = layout.sample_ids
            attention_mask, packed_rope = layout.attention_mask(), (layout.positions, layout.lengths)
            cp_index = layout.index[parallel_state.get_context_parallel_rank()]
        else:
            input_ids, labels = self.pad_batch(input_ids, labels)
        if sample_ids is not None and layout is None:
            sample_ids = self.pad_sample_ids(sample_ids.to(input_ids.device))
            attention_mask, packed_rope = sample_ids, pack_positions(sample_ids)
        features, dummy = None, pixel_values is None or pixel_values.shape[0] == 0
        if self.image_encoder is not None:
            tiles, dummy = self._vision_input(pixel_values, image_flags)
            features = self.image_encoder(tiles if stage.has_vit_embed else None)
            if self.text_decoder is None:
                return features
        elif stage.has_llm_embed:
            features = self.input_tensor  # the previous stage's projector output

        decoder_input = None
        if stage.has_llm_embed:
            decoder_input = self._cp_split(self.splice(input_ids, features, dummy), 0, layout)
            if self.parallel.sp:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
            decoder_input = input_for_full_recompute(decoder_input, self.text_decoder.decoder)
        moe = {}
        if self.moe_recorder is not None:
            self.moe_recorder.begin(input_ids.device)
            mask = self._padding_mask(padding, sample_ids, input_ids.shape[1], layout)
            moe = {} if mask is None else {"padding_mask": mask.to(input_ids.device)}
        out = self.text_decoder(input_ids=input_ids, position_ids=None, attention_mask=attention_mask,
                                decoder_input=decoder_input, rope_seq_len=seq_len, packed_rope=packed_rope,
                                **({} if cp_index is None else {"cp_index": cp_index}), **moe)
        if stage.has_llm_head:
            logits = self._mask_padded_vocab(out)
            out = logits if labels is None else self._loss(logits, labels, sample_ids, layout)
        return out if self.moe_recorder is None else self.moe_recorder.finish(out)


def load_full_state_dict(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Load a state dict that must fit the model exactly, naming every missing or unexpected tensor."""
    own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
