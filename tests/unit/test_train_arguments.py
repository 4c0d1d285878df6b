"""pretrain_vlm.py's command line: the reference scripts' flags are accepted, contradictions are named."""
import json
import re
import shlex
from pathlib import Path

import pytest

from mindspeed_mm.config.model_spec import LORA_PARTS, load_model_spec
from mindspeed_mm.training.arguments import ArgumentError, parse_args, reconcile_with_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "internvl3"


def script_argv(**values) -> list[str]:
    """The GPT_ARGS / MM_ARGS / OUTPUT_ARGS of the example launcher, with its shell variables filled in."""
    src = (EXAMPLES / "finetune_internvl3.sh").read_text()

    def fill(m):
        name = m.group(1) or m.group(3)
        return str(values.get(name, "x"))

    argv = []
    for block in ("GPT_ARGS", "MM_ARGS", "OUTPUT_ARGS"):
        text = re.search(block + r'="(.*?)"', src, re.S).group(1)
        argv += shlex.split(re.sub(r"\$\{(\w+)(:-[^}]*)?\}|\$(\w+)", fill, text))
    return argv


def wrapper_env(script: str) -> dict:
    """The defaults a model's wrapper script exports (MODEL, TP, PP, EXTRA_ARGS)."""
    src = (EXAMPLES / script).read_text()
    env = {m.group(1): m.group(2) for m in re.finditer(r"(\w+)=\$\{\w+:-([^}]*)\}", src)}
    env.update({m.group(1): m.group(2) for m in re.finditer(r"export (MODEL)=(\w+)", src)})
    env["EXTRA_ARGS"] = env.get("EXTRA_ARGS", "").strip('"')
    return env


@pytest.mark.parametrize("script,model,tp", [("finetune_internvl3_8B.sh", "model_8B.json", 1),
                                             ("finetune_internvl3_78B.sh", "model_78B.json", 8)])
def test_reference_scripts_parse_and_agree_with_their_model_json(script, model, tp):
    env = wrapper_env(script)
    argv = script_argv(**env, CP=1, MBS=1, GBS=64, MM_DATA=EXAMPLES / f"data_{env['MODEL']}.json",
                       MM_MODEL=EXAMPLES / model)
    args = parse_args(argv)
    assert args.bf16 and args.use_distributed_optimizer and args.tensor_model_parallel_size == tp
    assert args.sequence_parallel == (tp > 1)
    spec, warnings = reconcile_with_spec(args, load_model_spec(args.mm_model), cuda=False)
    assert warnings == ["--use-flash-attn: no CUDA flash kernel here; attention runs through torch SDPA's CPU kernel"]
    assert reconcile_with_spec(args, spec, cuda=True)[1] == []


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--mm-model", "m", "--mm-data", "d", "--train-iters", "1", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--bf16", "--fp16"], "mutually exclusive"),
    (["--calculate-per-sample-loss", "--calculate-per-token-loss"], "mutually exclusive"),
    (["--sequence-parallel"], "--sequence-parallel needs"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
])
def test_invalid_combinations(extra, message):
    with pytest.raises(ArgumentError, match=message):
        parse_args(["--mm-model", "m", "--mm-data", "d", "--train-iters", "1", *extra])


def test_train_iters_required():
    with pytest.raises(ArgumentError, match="--train-iters"):
        parse_args(["--mm-model", "m", "--mm-data", "d"])


@pytest.mark.parametrize("flag,value,field", [("--vocab-size", "1000", "vocab_size"),
                                              ("--rotary-base", "10000", "rotary_base"),
                                              ("--normalization", "LayerNorm", "normalization")])
def test_model_flags_must_agree_with_the_json(flag, value, field):
    args = parse_args(["--mm-model", str(EXAMPLES / "model_8B.json"), "--mm-data", "d", "--train-iters", "1",
                       "--bf16", flag, value])
    with pytest.raises(ArgumentError, match=f"contradicts text_decoder.{field}"):
        reconcile_with_spec(args, load_model_spec(args.mm_model), cuda=False)


def test_precision_must_agree_with_the_json():
    args = parse_args(["--mm-model", str(EXAMPLES / "model_8B.json"), "--mm-data", "d", "--train-iters", "1"])
    with pytest.raises(ArgumentError, match="params_dtype 'bf16'.*needs --bf16"):
        reconcile_with_spec(args, load_model_spec(args.mm_model), cuda=False)


def test_recompute_flags_fill_modules_that_set_none():
    args = parse_args(["--mm-model", str(EXAMPLES / "model_8B.json"), "--mm-data", "d", "--train-iters", "1",
                       "--bf16", "--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1"])
    spec, _ = reconcile_with_spec(args, load_model_spec(args.mm_model), cuda=False)
    assert spec.text.recompute_granularity == "full" and spec.vision.recompute_num_layers == 1


# ------------------------------------------------------------------------------------------------ LoRA and freezing
TINY = EXAMPLES / "model_tiny.json"


def _tiny_json(tmp_path, vision=None, projector=None, text=None, drop=()):
    """model_tiny.json with keys of its modules set (None: removed) or dropped."""
    raw = json.loads(TINY.read_text())
    sections = {"vision": raw["image_encoder"]["vision_encoder"], "projector": raw["image_encoder"]["vision_projector"],
                "text": raw["text_decoder"]}
    for name, values in (("vision", vision), ("projector", projector), ("text", text)):
        sections[name].update(values or {})
    for name, key in drop:
        sections[name].pop(key, None)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(raw))
    return path


def _reconcile(model, *flags):
    args = parse_args(["--mm-model", str(model), "--mm-data", "d", "--train-iters", "1", *map(str, flags)])
    return reconcile_with_spec(args, load_model_spec(args.mm_model), cuda=False)[0]


def test_lora_flags_add_adapters_with_internvl_defaults():
    spec = _reconcile(TINY, "--use-llm-lora", 8, "--use-backbone-lora", 4)
    t, v = spec.text.lora, spec.vision.lora
    assert (t.rank, t.alpha, t.dropout) == (8, 16.0, 0.05) and (v.rank, v.alpha, v.dropout) == (4, 8.0, 0.05)
    assert t.target_modules == LORA_PARTS["text"] and v.target_modules == LORA_PARTS["vision"]
    assert spec.text.frozen and spec.vision.frozen and not spec.projector.frozen
    spec = _reconcile(TINY, "--use-llm-lora", 8, "--lora-alpha", 8, "--lora-dropout", 0)
    assert (spec.text.lora.alpha, spec.text.lora.dropout, spec.vision.lora) == (8.0, 0.0, None)
    spec = _reconcile(TINY, "--use-llm-lora", 0, "--use-backbone-lora", 0)  # 0: off
    assert spec.text.lora is None and spec.vision.lora is None and not spec.text.frozen


def test_lora_flags_agree_with_the_json_lora(tmp_path):
    model = _tiny_json(tmp_path, text={"lora": {"rank": 8, "alpha": 4, "dropout": 0.1, "target_modules": ["q_proj"]}})
    spec = _reconcile(model, "--use-llm-lora", 8, "--lora-alpha", 4, "--lora-dropout", 0.1)
    assert spec.text.lora == load_model_spec(model).text.lora  # the JSON's (its targets kept)
    assert spec.text.lora.target_modules == ("q_proj",)


@pytest.mark.parametrize("flags,message", [
    (["--use-llm-lora", 4], r"^--use-llm-lora 4 contradicts text_decoder\.lora\.rank 8 of .*model\.json$"),
    (["--use-llm-lora", 0], r"^--use-llm-lora 0 \(no LoRA\) contradicts text_decoder\.lora\.rank 8 of "),
    (["--use-llm-lora", 8, "--lora-alpha", 16], r"^--lora-alpha 16\.0 contradicts text_decoder\.lora\.alpha 4\.0 "),
    (["--lora-dropout", 0.05], r"^--lora-dropout 0\.05 contradicts text_decoder\.lora\.dropout 0\.1 of "),
])
def test_lora_flag_contradicting_the_json_lora(tmp_path, flags, message):
    model = _tiny_json(tmp_path, text={"lora": {"rank": 8, "alpha": 4, "dropout": 0.1}})
    with pytest.raises(ArgumentError, match=message):
        _reconcile(model, *flags)


@pytest.mark.parametrize("flags,message", [
    (["--use-llm-lora", -1], r"^--use-llm-lora must be >= 0 \(a LoRA rank; 0: no LoRA\), got -1$"),
    (["--use-backbone-lora", -8], r"^--use-backbone-lora must be >= 0"),
    (["--lora-alpha", 0], r"^--lora-alpha must be > 0, got 0\.0$"),
    (["--lora-dropout", 1], r"^--lora-dropout must be in \[0, 1\), got 1\.0$"),
])
def test_bad_lora_values(flags, message):
    with pytest.raises(ArgumentError, match=message):
        parse_args(["--mm-model", "m", "--mm-data", "d", "--train-iters", "1", *map(str, flags)])


@pytest.mark.parametrize("flags,message", [
    (["--lora-alpha", 8], r"^--lora-alpha needs --use-llm-lora or --use-backbone-lora \(or a lora in .*\)$"),
    (["--unfreeze-vit-layers", 3], r"^--unfreeze-vit-layers 3: the ViT has 2 layers "
                                   r"\(image_encoder\.vision_encoder\.num_layers of .*model_tiny\.json\)$"),
    (["--unfreeze-vit-layers", -3], r"^--unfreeze-vit-layers -3: the ViT has 2 layers"),
])
def test_lora_and_unfreeze_flags_need_something_to_act_on(flags, message):
    with pytest.raises(ArgumentError, match=message):
        _reconcile(TINY, *flags)


def test_freeze_flags(tmp_path):
    # model_tiny.json says the ViT's freeze true and the projector's false; the LLM's is left out
    model = _tiny_json(tmp_path, drop=[("projector", "freeze")])
    spec = _reconcile(model, "--freeze-llm", "--freeze-backbone", "--freeze-mlp")
    assert spec.text.frozen and spec.vision.frozen and spec.projector.frozen
    base = load_model_spec(model)
    assert not base.text.frozen and not base.projector.frozen
    spec = _reconcile(model, "--use-llm-lora", 4, "--freeze-llm")  # the same as LoRA's default: fine
    assert spec.text.frozen and spec.text.freeze is True


@pytest.mark.parametrize("flag,module,key", [("--freeze-llm", "text", "text_decoder"),
                                             ("--freeze-backbone", "vision", "image_encoder.vision_encoder"),
                                             ("--freeze-mlp", "projector", "image_encoder.vision_projector")])
def test_freeze_flag_contradicting_an_explicit_freeze_false(tmp_path, flag, module, key):
    model = _tiny_json(tmp_path, **{module: {"freeze": False}})
    with pytest.raises(ArgumentError, match=rf"^{flag} contradicts {re.escape(key)}\.freeze false of .*model\.json$"):
        _reconcile(model, flag)


def test_unfreeze_flags(tmp_path):
    for n in (1, -1):  # InternVL's -N: the last N
        spec = _reconcile(TINY, "--unfreeze-vit-layers", n, "--unfreeze-lm-head")
        assert spec.vision.unfreeze_last_layers == 1 and spec.text.unfreeze_output_layer
    model = _tiny_json(tmp_path, vision={"unfreeze_last_layers": 2})
    assert _reconcile(model, "--unfreeze-vit-layers", -2).vision.unfreeze_last_layers == 2
    with pytest.raises(ArgumentError, match=r"^--unfreeze-vit-layers 1 contradicts image_encoder\.vision_encoder\."
                                            r"unfreeze_last_layers 2 of "):
        _reconcile(model, "--unfreeze-vit-layers", 1)


def test_load_adapter_flag_is_defined():
    args = parse_args(["--mm-model", "m", "--mm-data", "d", "--train-iters", "1", "--load-adapter", "adapters"])
    assert args.load_adapter == "adapters"


def test_lora_flag_error_exits_with_one_line(tmp_path, capsys):
    from mindspeed_mm.training.train import main

    model = _tiny_json(tmp_path, text={"freeze": False})
    assert main(["--mm-model", str(model), "--mm-data", "d", "--train-iters", "1", "--freeze-llm"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    want = f"pretrain_vlm.py: error: ArgumentError: --freeze-llm contradicts text_decoder.freeze false of {model}"
    assert err == [want], err
    assert main(["--mm-model", str(model), "--mm-data", "d", "--train-iters", "1", "--use-llm-lora", "-2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["pretrain_vlm.py: error: ArgumentError: --use-llm-lora must be >= 0 (a LoRA rank; 0: no LoRA), "
                   "got -2"], err
