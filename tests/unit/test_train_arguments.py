"""pretrain_vlm.py's command line: the reference scripts' flags are accepted, contradictions are named."""
import re
import shlex
from pathlib import Path

import pytest

from mindspeed_mm.config.model_spec import load_model_spec
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
