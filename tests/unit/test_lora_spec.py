"""LoRA's spec (config.model_spec: LoraSpec, lora_spec, the `lora` keys, `freeze`/`frozen`, the unfreeze
switches), the registry's trainable() rule, and the PEFT adapter mapping (models/internvl/hf/peft.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mindspeed_mm.config.model_spec import (
    LORA_PARTS, LoraSpec, ModelSpecError, load_model_spec, lora_spec, to_dict,
)
from mindspeed_mm.errors import CheckpointFormatError
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_config
from mindspeed_mm.models.internvl.hf.peft import PEFT_PREFIX, adapter_config, from_peft, to_peft
from mindspeed_mm.models.internvl.params import EMBEDDING, OUTPUT_LAYER, params, trainable
from mindspeed_mm.testing.tiny_checkpoint import tiny_native_config

VIT, LLM = "image_encoder.vision_encoder", "text_decoder"


def _spec(preset="vit300m", vision=None, text=None, projector_freeze=None):
    """A tiny preset's spec with these ViT / LLM fields replaced (a `lora` dict is read as the JSON's)."""
    s = spec_from_hf_config(tiny_native_config(preset))
    raw = to_dict(s)
    raw["image_encoder"]["vision_encoder"].update(vision or {})
    raw["text_decoder"].update(text or {})
    if projector_freeze is not None:
        raw["image_encoder"]["vision_projector"]["freeze"] = projector_freeze
    return load_model_spec(raw)


# ---------------------------------------------------------------------------------------------- lora_spec

@pytest.mark.parametrize("module", ["vision", "text"])
@pytest.mark.parametrize("raw, key, message", [
    ({"rank": -1}, "rank", ">= 0"),
    ({"rank": 4, "alpha": 0}, "alpha", "> 0"),
    ({"rank": 4, "alpha": -2.0}, "alpha", "> 0"),
    ({"rank": 4, "dropout": 1.0}, "dropout", "[0, 1)"),
    ({"rank": 4, "dropout": -0.1}, "dropout", "[0, 1)"),
    ({"rank": 4, "target_modules": ["q_proj", "lm_head"]}, "target_modules[1]", "'lm_head' is not a linear"),
    ({"rank": 4, "target_modules": []}, "target_modules", "is empty"),
    ({"rank": 4, "r": 4}, "r", ""),
    ({"alpha": 8}, "rank", "missing"),
    ({"rank": True}, "rank", ""),
    ({"rank": 2.5}, "rank", ""),
])
def test_lora_spec_errors_name_the_key(module, raw, key, message):
    path = f"{LLM if module == 'text' else VIT}.lora"
    with pytest.raises(ModelSpecError, match=r"^" + path.replace(".", r"\.") + r"\." + key.replace("[", r"\[")
                       .replace("]", r"\]") + ": ") as e:
        lora_spec(module, raw, path)
    assert message in str(e.value)


@pytest.mark.parametrize("module, other", [("vision", "o_proj"), ("text", "fc1"), ("vision", "gate_proj"),
                                            ("text", "attn.qkv")])
def test_a_linear_of_the_other_module_is_an_error(module, other):
    with pytest.raises(ModelSpecError, match=f"'{other}' is not a linear of this module"):
        lora_spec(module, {"rank": 4, "target_modules": [other]}, "x.lora")


def test_the_errors_from_a_model_json_name_the_full_key():
    with pytest.raises(ModelSpecError, match=r"^text_decoder\.lora\.alpha: must be > 0"):
        _spec(text={"lora": {"rank": 4, "alpha": 0}})
    with pytest.raises(ModelSpecError, match=r"^image_encoder\.vision_encoder\.lora\.target_modules\[0\]: "):
        _spec(vision={"lora": {"rank": 4, "target_modules": ["o_proj"]}})


@pytest.mark.parametrize("module", ["vision", "text"])
def test_rank_zero_is_no_lora(module):
    assert lora_spec(module, {"rank": 0}, "x") is None
    assert lora_spec(module, None, "x") is None
    spec = _spec(vision={"lora": {"rank": 0}}, text={"lora": {"rank": 0, "alpha": 16}})
    assert spec.vision.lora is None and spec.text.lora is None
    assert not any(p.adapter for p in params(spec, adapters=True))


@pytest.mark.parametrize("module", ["vision", "text"])
def test_defaults(module):
    lora = lora_spec(module, {"rank": 8}, "x")
    assert lora == LoraSpec(8, 16.0, 0.05, LORA_PARTS[module])
    assert lora.scaling == 2.0
    assert lora_spec(module, {"rank": 8, "alpha": None}, "x").alpha == 16.0
    assert lora_spec(module, {"rank": 8, "alpha": 4, "dropout": 0}, "x").scaling == 0.5
    assert lora_spec(module, {"rank": 3, "target_modules": None}, "x").target_modules == LORA_PARTS[module]


# The same linears by InternVL's own target names (its PEFT lists: the original ViT's attn.qkv, attn.proj,
# mlp.fc1, mlp.fc2; the LLM's self_attn.q_proj ...), ours (megatron's), and transformers' native ones.
SAME_PARTS = {
    "vision": [
        (["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"], ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
         ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.projection_layer", "mlp.fc1",
          "mlp.fc2"], ["qkv", "proj", "fc1", "fc2"]),
        (["attn.qkv"], ["linear_qkv"], ["q_proj", "k_proj", "v_proj"]),
        (["attn.proj", "mlp.fc2"], ["linear_proj", "linear_fc2"], ["projection_layer", "fc2"]),
    ],
    "text": [
        (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj"], ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
         ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["linear_qkv"]),
        (["mlp.gate_proj", "mlp.up_proj"], ["linear_fc1"], ["up_proj", "gate_proj"]),
        (["self_attn.o_proj", "mlp.down_proj"], ["linear_proj", "linear_fc2"], ["down_proj", "o_proj"]),
    ],
}


@pytest.mark.parametrize("module", ["vision", "text"])
def test_internvl_and_our_target_names_mean_the_same_parts(module):
    for group in SAME_PARTS[module]:
        got = {tuple(lora_spec(module, {"rank": 2, "target_modules": names}, "x").target_modules) for names in group}
        assert len(got) == 1, (group, got)
    everything = lora_spec(module, {"rank": 2, "target_modules": SAME_PARTS[module][0][0]}, "x")
    assert everything.target_modules == LORA_PARTS[module]


def test_target_modules_are_stored_in_part_order_without_repeats():
    lora = lora_spec("text", {"rank": 2, "target_modules": ["mlp.down_proj", "v_proj", "linear_qkv", "q_proj"]},
                     "x")
    assert lora.target_modules == ("q_proj", "k_proj", "v_proj", "down_proj")


def test_a_lora_spec_given_in_python_is_checked_like_json():
    """dataclasses.replace(spec.text, lora=LoraSpec(...)) goes through the same checks and normalisation."""
    spec = _spec()
    text = dataclasses.replace(spec.text, lora=LoraSpec(4, 8.0, 0.0, ("v_proj", "q_proj")))
    assert text.lora.target_modules == ("q_proj", "v_proj")
    assert dataclasses.replace(spec.text, lora=LoraSpec(0, 1.0, 0.0, ("q_proj",))).lora is None
    with pytest.raises(ModelSpecError, match=r"^image_encoder\.vision_encoder\.lora\.target_modules\[0\]: "):
        dataclasses.replace(spec.vision, lora=LoraSpec(4, 8.0, 0.0, ("o_proj",)))
    with pytest.raises(ModelSpecError, match=r"^text_decoder\.lora\.alpha: "):
        dataclasses.replace(spec.text, lora=LoraSpec(4, 0.0, 0.0, ("q_proj",)))


# ------------------------------------------------------------------------------------ JSON and freeze

def test_json_round_trip_keeps_lora_and_freeze():
    spec = _spec(vision={"lora": {"rank": 2, "alpha": 3, "dropout": 0.1, "target_modules": ["attn.qkv"]},
                         "freeze": False, "unfreeze_last_layers": 1},
                 text={"lora": {"rank": 4, "target_modules": ["self_attn.q_proj", "mlp.down_proj"]},
                       "unfreeze_output_layer": True})
    raw = to_dict(spec)
    assert raw["text_decoder"]["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.05,
                                           "target_modules": ["q_proj", "down_proj"]}
    assert "freeze" not in raw["text_decoder"], "freeze left unset must stay unset (LoRA decides)"
    assert raw["image_encoder"]["vision_encoder"]["freeze"] is False
    back = load_model_spec(raw)
    assert back == spec
    assert (back.vision.lora, back.text.lora) == (spec.vision.lora, spec.text.lora)
    assert back.vision.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert (back.vision.frozen, back.text.frozen) == (False, True)
    assert (back.vision.unfreeze_last_layers, back.text.unfreeze_output_layer) == (1, True)

    for freeze in (True, False):
        again = load_model_spec(to_dict(_spec(text={"lora": {"rank": 4}, "freeze": freeze})))
        assert (again.text.freeze, again.text.frozen) == (freeze, freeze)


def test_without_lora_the_json_has_no_lora_keys():
    raw = to_dict(_spec())
    for section in (raw["text_decoder"], raw["image_encoder"]["vision_encoder"]):
        assert not {"lora", "unfreeze_last_layers", "unfreeze_output_layer"} & set(section)
    assert raw["image_encoder"]["vision_encoder"]["freeze"] is True
    assert "freeze" not in raw["text_decoder"]


@pytest.mark.parametrize("lora, freeze, frozen", [
    (None, None, False), (None, False, False), (None, True, True),
    ({"rank": 4}, None, True), ({"rank": 4}, True, True), ({"rank": 4}, False, False),
    ({"rank": 0}, None, False),
])
def test_text_frozen_rule(lora, freeze, frozen):
    """The LLM is frozen iff freeze says so, or with LoRA when freeze is not given."""
    text = {} if lora is None else {"lora": lora}
    if freeze is not None:
        text["freeze"] = freeze
    assert _spec(text=text).text.frozen is frozen


@pytest.mark.parametrize("lora", [None, {"rank": 4}])
@pytest.mark.parametrize("freeze, frozen", [(None, True), (True, True), (False, False)])
def test_vision_frozen_rule(lora, freeze, frozen):
    """The ViT is frozen unless freeze is false, with LoRA or without."""
    vision = {} if lora is None else {"lora": lora}
    raw = to_dict(_spec())
    raw["image_encoder"]["vision_encoder"].pop("freeze")
    raw["image_encoder"]["vision_encoder"].update(vision)
    if freeze is not None:
        raw["image_encoder"]["vision_encoder"]["freeze"] = freeze
    assert load_model_spec(raw).vision.frozen is frozen


def test_unfreeze_last_layers_range():
    with pytest.raises(ModelSpecError, match=r"^image_encoder\.vision_encoder\.unfreeze_last_layers: "):
        _spec(vision={"unfreeze_last_layers": 3})
    with pytest.raises(ModelSpecError, match=r"^image_encoder\.vision_encoder\.unfreeze_last_layers: "):
        _spec(vision={"unfreeze_last_layers": -1})


# ------------------------------------------------------------------------------------------ trainable()

def _trainable(spec):
    return {p.name for p in params(spec, adapters=True) if trainable(spec, p.name)}


def test_trainable_with_lora_is_the_adapters_and_the_projector():
    spec = _spec(vision={"lora": {"rank": 2}}, text={"lora": {"rank": 4}})
    every = params(spec, adapters=True)
    adapters = {p.name for p in every if p.adapter}
    projector = {p.name for p in every if p.owner == "projector"}
    assert adapters and _trainable(spec) == adapters | projector
    frozen_projector = _spec(vision={"lora": {"rank": 2}}, text={"lora": {"rank": 4}}, projector_freeze=True)
    assert _trainable(frozen_projector) == adapters


def test_freeze_false_with_lora_trains_both():
    spec = _spec(vision={"lora": {"rank": 2}, "freeze": False}, text={"lora": {"rank": 4}, "freeze": False})
    assert _trainable(spec) == {p.name for p in params(spec, adapters=True)}


def test_unfreeze_last_layers():
    spec = _spec(vision={"lora": {"rank": 2}, "unfreeze_last_layers": 1}, text={"lora": {"rank": 4}},
                 projector_freeze=True)
    last = spec.vision.num_layers - 1
    vit = {p.name for p in params(spec) if p.owner == "vit_layer" and p.layer == last}
    assert vit and _trainable(spec) == vit | {p.name for p in params(spec, adapters=True) if p.adapter}
    every_layer = _spec(vision={"unfreeze_last_layers": spec.vision.num_layers}, projector_freeze=True)
    got = {n for n in _trainable(every_layer) if n.startswith("image_encoder.")}
    assert got == {p.name for p in params(every_layer) if p.owner == "vit_layer"}, "the embeddings stay frozen"


@pytest.mark.parametrize("preset, head", [("vit300m", OUTPUT_LAYER), ("qwen3_tied", EMBEDDING)])
def test_unfreeze_output_layer(preset, head):
    """The output layer trains under a frozen LLM; tied, that is the token embeddings."""
    spec = _spec(preset, text={"lora": {"rank": 4}, "unfreeze_output_layer": True}, projector_freeze=True)
    names = {p.name for p in params(spec)}
    assert head in names and (OUTPUT_LAYER in names) == (preset == "vit300m")
    llm = {n for n in _trainable(spec) if n.startswith("text_decoder.") and ".lora_" not in n}
    assert llm == {head}
    # without LoRA and without freeze the LLM trains whole; the switch changes nothing
    whole = _spec(preset, text={"unfreeze_output_layer": True})
    assert {p.name for p in params(whole) if p.name.startswith("text_decoder.")} <= _trainable(whole)
    # the output layer's switch leaves the ViT alone
    assert not {n for n in _trainable(spec) if n.startswith("image_encoder.encoder.") and ".lora_" not in n}


# --------------------------------------------------------------------------------------------------- PEFT

def _adapters(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p.name: torch.randn(p.shape, generator=g) for p in params(spec, adapters=True) if p.adapter}


LORAS = [
    ({"rank": 2, "alpha": 6, "dropout": 0.0}, {"rank": 4, "alpha": 8, "dropout": 0.0}),
    (None, {"rank": 4, "target_modules": ["q_proj", "v_proj"]}),
    ({"rank": 3, "target_modules": ["attn.proj", "k_proj"]}, None),
    ({"rank": 4, "alpha": 8}, {"rank": 4, "alpha": 8, "target_modules": ["linear_fc1", "o_proj"]}),
]


@pytest.mark.parametrize("preset", ["vit300m", "vit6b", "qwen3_vit6b", "internlm3_vit300m", "qwen3_tied"])
@pytest.mark.parametrize("loras", range(len(LORAS)))
def test_to_peft_from_peft_round_trip(preset, loras):
    vision, text = LORAS[loras]
    spec = _spec(preset, vision={"lora": vision} if vision else {}, text={"lora": text} if text else {})
    adapters = _adapters(spec)
    config = adapter_config(spec, "base")
    exported = to_peft(adapters, spec)
    assert all(k.startswith(PEFT_PREFIX + "model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in exported)
    specs, back = from_peft(config, exported, "x")
    assert specs == {"vision": spec.vision.lora, "text": spec.text.lora}
    assert back.keys() == adapters.keys()
    assert all(torch.equal(back[k], adapters[k]) for k in adapters)
    # PEFT's in-memory names (with the adapter's name) read the same
    specs2, back2 = from_peft(config, {k.replace(".weight", ".default.weight"): v for k, v in exported.items()}, "x")
    assert specs2 == specs and back2.keys() == back.keys()


def test_adapter_config_is_plain_lora():
    spec = _spec(vision={"lora": {"rank": 2, "alpha": 6}}, text={"lora": {"rank": 4, "alpha": 8}})
    config = adapter_config(spec, "base")
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert list(config["rank_pattern"].values()) == [2] and list(config["alpha_pattern"].values()) == [6.0]
    assert not config["use_dora"] and not config["use_rslora"] and config["modules_to_save"] is None
    with pytest.raises(ValueError, match="no LoRA"):
        adapter_config(_spec(), "base")


@pytest.fixture(scope="module")
def peft_pair():
    spec = _spec(vision={"lora": {"rank": 2, "alpha": 6}}, text={"lora": {"rank": 4, "alpha": 8}})
    return adapter_config(spec, "base"), to_peft(_adapters(spec), spec)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora"),
    ({"use_rslora": True}, "use_rslora"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"modules_to_save": ["multi_modal_projector"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
])
def test_from_peft_rejects_what_our_lora_does_not_have(peft_pair, change, message):
    config, state = peft_pair
    with pytest.raises(CheckpointFormatError, match=r"^adapter\.json: .*" + message):
        from_peft({**config, **change}, state, "adapter.json")


@pytest.mark.parametrize("key", [
    "base_model.model.model.multi_modal_projector.linear_1.lora_A.weight",
    "base_model.model.lm_head.lora_A.weight",
    "base_model.model.model.language_model.embed_tokens.lora_embedding_A",
    "base_model.model.model.language_model.layers.0.self_attn.q_norm.lora_A.weight",
])
def test_from_peft_rejects_a_key_that_is_not_an_adapted_linear(peft_pair, key):
    config, state = peft_pair
    with pytest.raises(CheckpointFormatError, match="is not a LoRA matrix of a linear"):
        from_peft(config, {**state, key: torch.zeros(4, 64)}, "adapter")


def test_from_peft_rejects_inconsistent_ranks(peft_pair):
    config, state = peft_pair
    # a tensor whose rank is not the config's
    key = next(k for k in state if ".language_model." in k and "lora_A" in k)
    with pytest.raises(CheckpointFormatError, match="does not have rank 4"):
        from_peft(config, {**state, key: torch.zeros(3, state[key].shape[1])}, "adapter")
    # two ranks within one module (one layer's o_proj at another rank, consistently in its A and B)
    a = "base_model.model.model.language_model.layers.1.self_attn.o_proj.lora_A.weight"
    b = a.replace("lora_A", "lora_B")
    changed = {**state, a: torch.zeros(2, state[a].shape[1]), b: torch.zeros(state[b].shape[0], 2)}
    pattern = {**config["rank_pattern"], r"model\.language_model\.layers\.1\.self_attn\.o_proj": 2}
    with pytest.raises(CheckpointFormatError, match="different \\(rank, alpha\\)"):
        from_peft({**config, "rank_pattern": pattern}, changed, "adapter")


def test_from_peft_rejects_an_incomplete_adapter(peft_pair):
    """A B without its A, or a layer with fewer adapted linears than the others: not one LoRA per module."""
    config, state = peft_pair
    a = next(k for k in state if ".vision_tower." in k and "lora_A" in k)
    missing = a.replace(".", r"\.")
    with pytest.raises(CheckpointFormatError, match=f"no {missing}: every adapted layer"):
        from_peft(config, {k: v for k, v in state.items() if k != a}, "adapter")
    layer1 = [k for k in state if ".language_model.layers.1.mlp.down_proj." in k]
    with pytest.raises(CheckpointFormatError, match="down_proj"):
        from_peft(config, {k: v for k, v in state.items() if k not in layer1}, "adapter")


# ------------------------------------------------------------------------ LoRA with an explicit freeze false

def test_lora_with_freeze_false_trains_base_and_adapters_and_says_so_once(megatron_single_rank):
    from mindspeed_mm.models.internvl.model import InternVLModel
    from mindspeed_mm.training.trainable_report import TrainableReport

    both = _spec(text={"lora": {"rank": 4}, "freeze": False})
    lines: list[str] = []
    TrainableReport([InternVLModel(both)], both, lines.append)
    notes = [line for line in lines if "freeze false" in line]
    assert notes == [f"{LLM}: LoRA and freeze false: its base weights train too"], lines
    model = InternVLModel(both)
    llm = {n: p.requires_grad for n, p in model.named_parameters() if n.startswith("text_decoder.")}
    assert all(llm.values()) and any(".lora_a" in n for n in llm)
    # freeze left unsaid: LoRA freezes the base, and nothing is said
    only = _spec(text={"lora": {"rank": 4}})
    lines.clear()
    TrainableReport([InternVLModel(only)], only, lines.append)
    assert not [line for line in lines if "freeze false" in line]
    trains = {n for n, p in InternVLModel(only).named_parameters() if p.requires_grad and n.startswith("text_")}
    assert trains and all(".lora_" in n for n in trains)
