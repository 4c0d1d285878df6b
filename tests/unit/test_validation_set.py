"""The validation set in the data JSON (`valid_data_path`, `valid_data_folder`) and `--eval-interval`'s checks:
errors name the key or flag, before torch or any process group."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mindspeed_mm.data.data_spec import DataSpecError, load_data_spec
from mindspeed_mm.testing.tiny_run import write_data_json

REPO = Path(__file__).resolve().parents[2]
BASIC = "dataset_param.basic_parameters"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny HF checkpoint (its tokenizer), a model JSON, a training and a validation file."""
    from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint
    from mindspeed_mm.testing.tiny_run import write_model_json

    root = tmp_path_factory.mktemp("valid_set")
    hf = write_tiny_checkpoint(root / "hf", "native", "tp4", seed=1)
    record = json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    (root / "train.jsonl").write_text(record + "\n")
    (root / "valid.jsonl").write_text(record + "\n")
    (root / "other").mkdir()
    write_model_json(hf, root / "model.json")
    return root, hf


def data_dict(files, **basic) -> dict:
    root, hf = files
    path = write_data_json(root / "data.json", root / "train.jsonl", hf, image_size=448)
    raw = json.loads(path.read_text())
    raw["dataset_param"]["basic_parameters"].update(basic)
    return raw


def test_valid_data_path_read_with_the_training_folder(files):
    root, _ = files
    param = load_data_spec(data_dict(files, valid_data_path=str(root / "valid.jsonl"),
                                     max_dynamic_patch=3, data_augment=True)).dataset_param
    (v,) = param.valid_parameters
    assert v.data_path == str(root / "valid.jsonl") and v.data_folder == str(root)  # data_folder's default
    assert v.max_dynamic_patch == 3 and v.data_augment is False and v.repeat_time == 1.0
    v2 = load_data_spec(data_dict(files, valid_data_path=str(root / "valid.jsonl"),
                                  valid_data_folder=str(root / "other"))).dataset_param.valid_parameters[0]
    assert v2.data_folder == str(root / "other")
    assert load_data_spec(data_dict(files)).dataset_param.valid_parameters == ()


def test_a_list_of_datasets_and_a_meta_json(files):
    root, _ = files
    raw = data_dict(files)
    one = raw["dataset_param"]["basic_parameters"]
    raw["dataset_param"]["basic_parameters"] = [{**one, "valid_data_path": str(root / "valid.jsonl")}, dict(one),
                                                {**one, "valid_data_path": str(root / "train.jsonl")}]
    valid = load_data_spec(raw).dataset_param.valid_parameters
    assert [v.data_path for v in valid] == [str(root / "valid.jsonl"), str(root / "train.jsonl")]
    meta = root / "meta.json"
    meta.write_text(json.dumps({"a": {"root": str(root), "annotation": str(root / "train.jsonl")}}))
    raw = data_dict(files)
    del raw["dataset_param"]["basic_parameters"]
    raw["dataset_param"].update(meta_path=str(meta), valid_data_path=str(root / "valid.jsonl"))
    (v,) = load_data_spec(raw).dataset_param.valid_parameters
    assert v.data_path == str(root / "valid.jsonl") and v.data_folder is None  # paths relative to its folder


@pytest.mark.parametrize("basic,top,key,message", [
    ({"valid_data_path": 3}, {}, f"{BASIC}.valid_data_path", "expected"),
    ({"valid_data_path": "valid.txt"}, {}, f"{BASIC}.valid_data_path", ".jsonl"),
    ({"valid_data_path": ""}, {}, f"{BASIC}.valid_data_path", "must not be empty"),
    ({"valid_data_folder": "x"}, {}, f"{BASIC}.valid_data_folder", "without valid_data_path"),
    ({"valid_data_path": "v.jsonl", "valid_data_folder": False}, {}, f"{BASIC}.valid_data_folder", "expected"),
    ({}, {"valid_data_path": "v.jsonl"}, "dataset_param.valid_data_path", "meta_path"),
], ids=["wrong_type", "suffix", "empty", "folder_alone", "folder_type", "top_level_without_meta"])
def test_data_json_errors_name_the_key(files, basic, top, key, message):
    raw = data_dict(files, **basic)
    raw["dataset_param"].update(top)
    with pytest.raises(DataSpecError, match=message) as e:
        load_data_spec(raw)
    assert key in str(e.value)


def _argv(files, data: dict, *extra) -> list[str]:
    root, _ = files
    path = root / f"data_{abs(hash(json.dumps(data, sort_keys=True)))}.json"
    path.write_text(json.dumps(data))
    return ["--mm-model", str(root / "model.json"), "--mm-data", str(path), "--train-iters", "1",
            "--num-workers", "0", *extra]


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_missing_validation_files_name_the_key(files, folder):
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.train import check_inputs

    root, _ = files
    basic = ({"valid_data_path": str(root / "valid.jsonl"), "valid_data_folder": str(root / "absent")} if folder
             else {"valid_data_path": str(root / "absent.jsonl")})
    with pytest.raises(DataSpecError, match="absent") as e:
        check_inputs(parse_args(_argv(files, data_dict(files, **basic))))
    assert f"{BASIC}.valid_data_{'folder' if folder else 'path'}" in str(e.value)


def test_eval_interval_without_a_validation_set_is_accepted(files):
    """The reference scripts pass --eval-interval 5000 with no validation set; Megatron then skips validation."""
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.train import check_inputs

    check_inputs(parse_args(_argv(files, data_dict(files), "--eval-interval", "5", "--eval-iters", "2")))


@pytest.mark.parametrize("flag", ["--eval-interval", "--eval-iters"])
def test_eval_flags_must_be_positive(flag):
    from mindspeed_mm.training.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match=f"{flag} must be >= 1"):
        parse_args(["--mm-model", "m", "--mm-data", "d", "--train-iters", "1", flag, "0"])
