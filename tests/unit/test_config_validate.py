"""The one validator of the model, data and inference JSONs (mindspeed_mm.config.validate): one error type, the
JSON reader, the typed section reader; and the model spec's split into architecture and run settings."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from mindspeed_mm.config.model_spec import (
    RUN_SETTINGS,
    ModelSpecError,
    architecture_differences,
    load_model_spec,
    to_dict,
)
from mindspeed_mm.config.validate import ConfigError, Section, read_json
from mindspeed_mm.data.data_spec import DataSpecError, load_data_spec
from mindspeed_mm.errors import UserError
from mindspeed_mm.inference.config import InferenceConfigError, load_inference_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "internvl3"


def test_one_error_type():
    assert ModelSpecError is DataSpecError is InferenceConfigError is ConfigError
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    e = ConfigError("a.b", "bad", "f.json")
    assert (str(e), e.key_path, e.detail, e.source) == ("a.b: bad (in f.json)", "a.b", "bad", "f.json")
    assert str(ConfigError("", "bad", "f.json")) == "f.json: bad" and str(ConfigError("a", "bad")) == "a: bad"
    again = pickle.loads(pickle.dumps(e))
    assert (str(again), again.key_path, again.source) == (str(e), "a.b", "f.json")


@pytest.mark.parametrize("load", [load_model_spec, load_data_spec, load_inference_config])
def test_every_json_is_read_the_same_way(tmp_path, load):
    with pytest.raises(ConfigError, match=r"nope\.json: cannot read the file"):
        load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n}')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 3 column 1"):
        load(bad)
    bad.write_text('{"x": {"a": 1, "a": 2}}')
    with pytest.raises(ConfigError, match=r"bad\.json: duplicate key 'a'"):
        load(bad)


def test_section_types_and_unknown_keys():
    s = Section({"n": 3, "f": 2, "b": True, "z": None, "c": "x", "num_layer": 1}, "top")
    assert s.get("n", int) == 3 and s.get("f", float) == 2.0 and isinstance(s.get("f", float), float)
    assert s.get("z", int, nullable=True) is None and s.get("absent", int, 7) == 7
    for name, kind, kw, words in (("b", int, {}, "top.b: expected int, got bool True"),
                                  ("z", int, {}, "top.z: expected int, got null"),
                                  ("c", str, {"choices": ("y",)}, 'top.c: "x" is not supported; expected "y"'),
                                  ("n", int, {"minimum": 4}, "top.n: must be >= 4, got 3"),
                                  ("absent", int, {}, "top.absent: missing required key")):
        with pytest.raises(ConfigError) as e:
            s.get(name, kind, **kw)
        assert str(e.value) == words
    s.accept("num_layers")
    with pytest.raises(ConfigError, match=r"^top\.num_layer: unknown key \(value int 1\); did you mean 'num_layers'"
                                          r"\?; known keys here: absent, b, c, f, n, num_layers, z$"):
        s.done()
    assert read_json(EXAMPLES / "model_8B.json")["model_id"] == "InternVL3"


def test_run_settings_and_architecture():
    assert set(RUN_SETTINGS) == {
        *(f"{m}.{k}" for m in ("image_encoder.vision_encoder", "text_decoder")
          for k in ("freeze", "lora", "params_dtype", "pipeline_num_layers", "init_method_std", "recompute_granularity",
                    "recompute_method", "recompute_num_layers")),
        "image_encoder.vision_encoder.unfreeze_last_layers", "text_decoder.unfreeze_output_layer",
        *(f"image_encoder.vision_encoder.{k}" for k in ("drop_path_rate", "initializer_factor", "sequence_parallel",
                                                        "context_parallel_size")),
        *(f"text_decoder.{k}" for k in ("max_position_embeddings", "rope_scaling", "variable_seq_lengths",
                                        "moe_aux_loss_coeff", "moe_z_loss_coeff")),
        "image_encoder.vision_projector.freeze", "pre_process", "post_process"}
    a = load_model_spec(EXAMPLES / "model_8B.json")
    raw = to_dict(a)
    raw["text_decoder"].update(freeze=True, params_dtype="fp32", pipeline_num_layers=[14, 14], rope_scaling=None,
                               recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    raw["image_encoder"]["vision_encoder"].update(pipeline_num_layers=[24, 0], drop_path_rate=0.0, freeze=False)
    assert architecture_differences(a, load_model_spec(raw)) == []
    raw["text_decoder"]["attention_softmax_in_fp32"] = False
    raw["image_encoder"]["vision_encoder"]["layernorm_epsilon"] = 1e-5
    assert architecture_differences(a, load_model_spec(raw)) == [
        ("image_encoder.vision_encoder.layernorm_epsilon", 1e-6, 1e-5),
        ("text_decoder.attention_softmax_in_fp32", True, False)]


def test_data_and_inference_errors_name_the_file_after_the_key(tmp_path):
    raw = json.loads((EXAMPLES / "data_8B.json").read_text())
    raw["dataset_param"]["use_thumbnail"] = 1
    path = tmp_path / "data.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataSpecError, match=r"^dataset_param\.use_thumbnail: expected bool, got int 1 \(in .*data"
                                            r"\.json\)$"):
        load_data_spec(path)
