"""Bad input gets a clear error that names the field: configs, tensors, inputs, masks, checkpoints, adapters.

Each case builds one valid call, breaks one thing, and asserts the exception type and that the message names
what is wrong (``pytest.raises(..., match=...)``).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import reflora as rf
from reflora import CheckpointError, ConfigError, InputError

CONFIG = rf.GPT2Config(vocab_size=13, n_positions=7, n_embd=6, n_layer=2, n_head=3)
LORA = rf.LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn", "c_fc"], lora_dropout=0.1)
C_ATTN_A = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
C_FC = "transformer.h.1.mlp.c_fc"


def valid_call() -> dict:
    """Keyword arguments of a valid ``gpt2_forward`` call, with labels and dlogits beside them."""
    rng = np.random.default_rng(40)
    plan = rf.plan_lora(CONFIG, LORA)
    batch, seq_len = 2, 5
    return {
        "params": rf.init_gpt2_params(CONFIG, rng),
        "config": CONFIG,
        "input_ids": rng.integers(0, CONFIG.vocab_size, (batch, seq_len)),
        "attention_mask": np.ones((batch, seq_len), dtype=np.int64),
        "position_ids": np.arange(seq_len)[None, :],
        "adapter": rf.init_lora_adapter(plan, rng),
        "lora": LORA,
        "dropout_masks": rf.draw_dropout_masks(plan, LORA.lora_dropout, batch, seq_len, rng),
    }


def test_the_valid_call_is_valid():
    rf.gpt2_forward(**valid_call())


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: rf.LoraConfig(r=0), r"lora\.r must be an integer >= 1, got 0"),
        (lambda: rf.LoraConfig(r=2.5), r"lora\.r must be an integer"),
        (lambda: rf.LoraConfig(rank_pattern={"c_fc": 0}), r"lora\.rank_pattern\['c_fc'\]"),
        (lambda: rf.LoraConfig(lora_alpha=float("nan")), r"lora\.lora_alpha must be a finite number"),
        (lambda: rf.LoraConfig(lora_dropout=1.0), r"lora\.lora_dropout must be a number in \[0, 1\)"),
        (lambda: rf.LoraConfig(bias="some"), r"lora\.bias must be one of"),
        (lambda: rf.LoraConfig(target_modules=[]), r"lora\.target_modules must be a non-empty list"),
        (lambda: rf.LoraConfig(target_modules="c_(attn"), r"lora\.target_modules is not a valid regex"),
        (lambda: rf.LoraConfig(target_modules=".*c_attn", layers_to_transform=[0]), r"lora\.layers_to_transform"),
        (lambda: rf.LoraConfig(layers_pattern="h"), r"lora\.layers_pattern is set, so lora\.layers_to_transform"),
        (lambda: rf.LoraConfig(qkv_slices=["q", "x"]), r"lora\.qkv_slices must be a non-empty subset"),
        (lambda: rf.LoraConfig(init_lora_weights="loftq"), r"lora\.init_lora_weights='loftq' is not supported"),
        (lambda: rf.LoraConfig.from_dict({"use_qalora": True}), r"lora\.use_qalora=True is not supported"),
        (lambda: rf.LoraConfig.from_dict({"peft_type": "IA3"}), r"lora\.peft_type='IA3'"),
        (lambda: rf.LoraConfig.from_dict({"rank": 4}), r"lora\.rank is not a LoraConfig field"),
        (lambda: rf.GPT2Config(n_embd=10, n_head=3), r"gpt2\.n_embd \(10\) must be divisible by gpt2\.n_head \(3\)"),
        (lambda: rf.GPT2Config(n_layer=0), r"gpt2\.n_layer must be a positive integer"),
        (lambda: rf.GPT2Config(activation_function="relu"), r"gpt2\.activation_function='relu' is not supported"),
        (lambda: rf.GPT2Config.from_dict({"scale_attn_by_inverse_layer_idx": True}),
         r"gpt2\.scale_attn_by_inverse_layer_idx=True is not supported"),
        (lambda: rf.GPT2Config.from_dict({"n_embed": 64}), r"gpt2\.n_embed is not a GPT2Config field"),
    ],
)  # fmt: skip
def test_bad_config_fields_are_named(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


@pytest.mark.parametrize(
    ("lora", "match"),
    [
        (rf.LoraConfig(target_modules=["q_proj", "v_proj"]), r"target_modules=\['q_proj', 'v_proj'\] matches no module"),
        (rf.LoraConfig(target_modules="transformer\\.h\\.9\\..*"), r"matches no module"),
        (rf.LoraConfig(target_modules=["ln_1"]), r"matches 'transformer\.h\.0\.ln_1', which is not a Conv1D"),
        (rf.LoraConfig(target_modules=".*wpe"), r"matches 'transformer\.wpe', which is not a Conv1D"),
        (rf.LoraConfig(target_modules=["lm_head"]), r"matches 'lm_head', which is not a Conv1D"),
        (rf.LoraConfig(target_modules=["mlp"]), r"matches 'transformer\.h\.0\.mlp', which is not a Conv1D"),
        (rf.LoraConfig(target_modules=["c_attn"], layers_to_transform=[1, 5]),
         r"layers_to_transform names layers \[5\], but gpt2\.n_layer is 2"),
    ],
)  # fmt: skip
def test_unmatched_or_unadaptable_targets_are_named(lora, match):
    with pytest.raises(ConfigError, match=match):
        rf.plan_lora(CONFIG, lora)


# ----------------------------------------------------------------------------------------------
# tensors and inputs
# ----------------------------------------------------------------------------------------------


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _set(d: dict, key: str, value) -> dict:
    return {**d, key: value}


BROKEN_CALLS = {
    # params
    "params missing a key": (lambda c: _set(c, "params", _drop(c["params"], "transformer.wpe.weight")),
                             r"params do not match the config: missing \['transformer\.wpe\.weight'\]"),
    "params unexpected key": (lambda c: _set(c, "params", {**c["params"], "lm_head.weight": c["params"]["transformer.wte.weight"]}),
                              r"params do not match the config: .*unexpected \['lm_head\.weight'\]"),
    "params transposed weight": (lambda c: _set(c, "params", _set(c["params"], "transformer.h.0.attn.c_attn.weight",
                                                                  c["params"]["transformer.h.0.attn.c_attn.weight"].T)),
                                 r"params\['transformer\.h\.0\.attn\.c_attn\.weight'\] has shape \(18, 6\), expected \(6, 18\)"),
    "params float16": (lambda c: _set(c, "params", {k: v.astype(np.float16) for k, v in c["params"].items()}),
                       r"params must be float32 or float64; transformer\.wte\.weight is float16"),
    "params integer": (lambda c: _set(c, "params", {k: v.astype(np.int64) for k, v in c["params"].items()}),
                       r"params must be float32 or float64"),
    "params mixed dtypes": (lambda c: _set(c, "params", _set(c["params"], "transformer.ln_f.bias",
                                                             c["params"]["transformer.ln_f.bias"].astype(np.float32))),
                            r"params\['transformer\.ln_f\.bias'\] has dtype float32"),
    # adapter
    "adapter without lora": (lambda c: _set(c, "lora", None), r"adapter and lora must be given together"),
    "lora without adapter": (lambda c: _set(c, "adapter", None), r"adapter and lora must be given together"),
    "adapter missing a key": (lambda c: _set(c, "adapter", _drop(c["adapter"], C_ATTN_A)),
                              r"adapter tensors do not match the LoRA config: missing \['base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight'\]"),
    "adapter transposed A": (lambda c: _set(c, "adapter", _set(c["adapter"], C_ATTN_A, c["adapter"][C_ATTN_A].T)),
                             r"adapter\['base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight'\] has shape \(6, 2\), expected \(2, 6\)"),
    "adapter float32": (lambda c: _set(c, "adapter", _set(c["adapter"], C_ATTN_A, c["adapter"][C_ATTN_A].astype(np.float32))),
                        r"adapter\['.*c_attn\.lora_A\.weight'\] has dtype float32, but the params are float64"),
    # ids, embeddings, mask, positions
    "input_ids float": (lambda c: _set(c, "input_ids", c["input_ids"].astype(np.float64)), r"input_ids must be integers, got dtype float64"),
    "input_ids 1-D": (lambda c: _set(c, "input_ids", c["input_ids"][0]), r"input_ids must have shape \(batch, seq_len\)"),
    "input_ids empty": (lambda c: _set(c, "input_ids", c["input_ids"][:, :0]), r"input_ids must have shape \(batch, seq_len\) with both > 0"),
    "token id = vocab_size": (lambda c: _set(c, "input_ids", np.full_like(c["input_ids"], 13)),
                              r"input_ids must lie in \[0, vocab_size=13\), got values in \[13, 13\]"),
    "negative token id": (lambda c: _set(c, "input_ids", np.full_like(c["input_ids"], -1)), r"input_ids must lie in \[0, vocab_size=13\)"),
    "ids and embeds": (lambda c: _set(c, "inputs_embeds", np.zeros((2, 5, 6))), r"give exactly one of input_ids and inputs_embeds"),
    "neither ids nor embeds": (lambda c: _set(c, "input_ids", None), r"give exactly one of input_ids and inputs_embeds"),
    "inputs_embeds width": (lambda c: {**_set(c, "input_ids", None), "inputs_embeds": np.zeros((2, 5, 4))},
                            r"inputs_embeds must have shape \(batch, seq_len, n_embd=6\), got \(2, 5, 4\)"),
    "inputs_embeds dtype": (lambda c: {**_set(c, "input_ids", None), "inputs_embeds": np.zeros((2, 5, 6), np.float32)},
                            r"inputs_embeds has dtype float32, but the params are float64"),
    "sequence too long": (lambda c: {**c, "input_ids": np.zeros((2, 8), np.int64), "attention_mask": None,
                                     "position_ids": None, "dropout_masks": None, "lora": None, "adapter": None},
                          r"sequence length 8 exceeds n_positions=7"),
    "attention_mask shape": (lambda c: _set(c, "attention_mask", np.ones((2, 4), np.int64)),
                             r"attention_mask has shape \(2, 4\), expected \(2, 5\)"),
    "attention_mask values": (lambda c: _set(c, "attention_mask", np.full((2, 5), 2)), r"attention_mask must hold only 0 and 1"),
    "position_ids shape": (lambda c: _set(c, "position_ids", np.zeros((3, 5), np.int64)),
                           r"position_ids has shape \(3, 5\), expected \(2, 5\) or \(1, 5\)"),
    "position_ids float": (lambda c: _set(c, "position_ids", np.zeros((1, 5))), r"position_ids must be integers"),
    "position_ids too large": (lambda c: _set(c, "position_ids", np.full((1, 5), 7)),
                               r"position_ids must lie in \[0, n_positions=7\), got values in \[7, 7\]"),
    # dropout masks
    "masks without lora": (lambda c: {**c, "lora": None, "adapter": None}, r"dropout_masks were given without a LoRA config"),
    "masks but no dropout": (lambda c: {**c, "lora": rf.LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn", "c_fc"])},
                             r"dropout_masks were given, but lora\.lora_dropout is 0"),
    "mask missing a module": (lambda c: _set(c, "dropout_masks", _drop(c["dropout_masks"], C_FC)),
                              r"dropout_masks need one mask per targeted module: missing \['transformer\.h\.1\.mlp\.c_fc'\]"),
    "mask shape": (lambda c: _set(c, "dropout_masks", _set(c["dropout_masks"], C_FC, np.ones((2, 5, 24)))),
                   r"dropout_masks\['transformer\.h\.1\.mlp\.c_fc'\] has shape \(2, 5, 24\), expected \(2, 5, 6\)"),
    "mask dtype": (lambda c: _set(c, "dropout_masks", _set(c["dropout_masks"], C_FC, np.ones((2, 5, 6), np.float32))),
                   r"dropout_masks\['transformer\.h\.1\.mlp\.c_fc'\] has dtype float32"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BROKEN_CALLS))
def test_bad_forward_inputs_are_named(name):
    breaker, match = BROKEN_CALLS[name]
    with pytest.raises(InputError, match=match):
        rf.gpt2_forward(**breaker(valid_call()))


def test_bad_backward_and_loss_inputs_are_named():
    call = valid_call()
    logits, cache = rf.gpt2_forward(**call)
    with pytest.raises(InputError, match=r"dlogits has shape \(2, 5, 12\), expected \(2, 5, 13\)"):
        rf.gpt2_backward(np.zeros((2, 5, 12)), cache, [C_ATTN_A])
    with pytest.raises(
        InputError, match=r"cannot differentiate with respect to unknown keys \['transformer\.h\.7\.ln_1\.weight'\]"
    ):
        rf.gpt2_backward(np.zeros_like(logits), cache, ["transformer.h.7.ln_1.weight"])
    kwargs = {k: v for k, v in call.items() if k not in ("params", "config", "input_ids")}
    with pytest.raises(InputError, match=r"labels has shape \(2, 4\), expected \(2, 5\)"):
        rf.gpt2_loss_and_grads(call["params"], CONFIG, call["input_ids"], call["input_ids"][:, :4], **kwargs)
    labels = np.full((2, 5), -100)
    labels[:, 0] = 1  # the first label is never a target after the shift
    with pytest.raises(ValueError, match=r"labels: every label after the causal shift is -100"):
        rf.gpt2_loss_and_grads(call["params"], CONFIG, call["input_ids"], labels, **kwargs)
    embeds = call["params"]["transformer.wte.weight"][call["input_ids"]]
    _, cache = rf.gpt2_forward(**{**call, "input_ids": None, "inputs_embeds": embeds})
    with pytest.raises(InputError, match=r"the gradient of transformer\.wte\.weight needs input_ids"):
        rf.gpt2_backward(np.zeros_like(logits), cache, ["transformer.wte.weight"])


def test_init_rejects_unknown_lora_init():
    with pytest.raises(ValueError, match=r"init must be one of"):
        rf.init_lora_adapter(rf.plan_lora(CONFIG, LORA), np.random.default_rng(0), init="loftq")


# ----------------------------------------------------------------------------------------------
# checkpoints and adapters
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path):
    params = rf.init_gpt2_params(CONFIG, np.random.default_rng(41))
    rf.save_gpt2(tmp_path, params, CONFIG)
    return tmp_path, params


def _rewrite(path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.pop("transformer.h.1.ln_2.bias"), r"keys do not match GPT-2 .*missing \['transformer\.h\.1\.ln_2\.bias'\]"),
        (lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(6)}),
         r"keys do not match GPT-2 .*unexpected \['transformer\.h\.2\.ln_1\.weight'\]"),
        (lambda t: t.update({"transformer.wpe.weight": np.zeros((8, 6))}),
         r"transformer\.wpe\.weight has shape \(8, 6\), expected \(7, 6\)"),
        (lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1.0}),
         r"lm_head\.weight is not tied to transformer\.wte\.weight"),
    ],
)  # fmt: skip
def test_gpt2_checkpoint_mismatches_are_named(saved_model, change, match):
    folder, _ = saved_model
    _rewrite(folder / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=match):
        rf.load_gpt2(folder)


def test_gpt2_checkpoint_file_problems_are_named(saved_model, tmp_path_factory):
    folder, _ = saved_model
    with pytest.raises(CheckpointError, match=r"no such file"):
        rf.load_gpt2(tmp_path_factory.mktemp("empty") / "model.safetensors", CONFIG)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file"):
        rf.load_gpt2(folder)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        rf.load_gpt2(folder)
    (folder / "config.json").write_text(json.dumps({"n_embd": 6, "n_head": 4}))
    with pytest.raises(ConfigError, match=r"gpt2\.n_embd \(6\) must be divisible by gpt2\.n_head \(4\)"):
        rf.load_gpt2(folder)


@pytest.fixture
def saved_adapter(tmp_path):
    lora = rf.LoraConfig(r=2, lora_alpha=4.0, target_modules=["c_attn", "c_fc"], bias="lora_only")
    plan = rf.plan_lora(CONFIG, lora)
    adapter = rf.init_lora_adapter(plan, np.random.default_rng(42))
    params = rf.init_gpt2_params(CONFIG, np.random.default_rng(43))
    biases = {k: params[k] for k in rf.trainable_bias_keys(CONFIG, lora, plan)}
    rf.save_adapter(tmp_path, adapter, lora, CONFIG, biases=biases)
    return tmp_path


def _edit_adapter_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_adapter_config_that_disagrees_with_its_tensors_is_named(saved_adapter):
    rf.load_adapter(saved_adapter, CONFIG)  # valid as saved
    _edit_adapter_config(saved_adapter, r=4)
    with pytest.raises(CheckpointError, match=re.escape(
        "lora_A.weight has shape (2, 6), but adapter_config.json implies (4, 6) (check r, rank_pattern and target_modules)"
    )):  # fmt: skip
        rf.load_adapter(saved_adapter, CONFIG)
    _edit_adapter_config(saved_adapter, r=2, rank_pattern={"c_fc": 3})
    with pytest.raises(
        CheckpointError,
        match=r"mlp\.c_fc\.lora_A\.weight has shape \(2, 6\), but adapter_config\.json implies \(3, 6\)",
    ):
        rf.load_adapter(saved_adapter, CONFIG)
    _edit_adapter_config(saved_adapter, rank_pattern={}, target_modules=["c_attn"])
    with pytest.raises(
        CheckpointError, match=r"tensors disagree with adapter_config\.json: missing \[\], unexpected \['.*mlp\.c_fc"
    ):
        rf.load_adapter(saved_adapter, CONFIG)
    _edit_adapter_config(saved_adapter, target_modules=["c_attn", "c_fc", "mlp.c_proj"])
    with pytest.raises(
        CheckpointError, match=r"tensors disagree with adapter_config\.json: missing \['.*mlp\.c_proj\.lora_A"
    ):
        rf.load_adapter(saved_adapter, CONFIG)


def test_adapter_bias_and_field_problems_are_named(saved_adapter):
    _edit_adapter_config(saved_adapter, bias="all")
    with pytest.raises(
        CheckpointError, match=r"bias='all' but the file lacks \['base_model\.model\.transformer\.h\.0\.ln_1\.bias'"
    ):
        rf.load_adapter(saved_adapter, CONFIG)
    _edit_adapter_config(saved_adapter, bias="lora_only", use_qalora=True)
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: lora\.use_qalora=True is not supported"):
        rf.load_adapter(saved_adapter, CONFIG)
    _edit_adapter_config(saved_adapter, use_qalora=False, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match=r"target_modules=\['q_proj'\] matches no module"):
        rf.load_adapter(saved_adapter, CONFIG)


def test_save_adapter_rejects_bad_tensors_and_missing_biases(tmp_path):
    lora = rf.LoraConfig(r=2, target_modules=["c_attn"], bias="all")
    adapter = rf.init_lora_adapter(rf.plan_lora(CONFIG, lora), np.random.default_rng(44))
    with pytest.raises(CheckpointError, match=r"bias='all' saves the trained biases: pass biases"):
        rf.save_adapter(tmp_path, adapter, lora, CONFIG)
    broken = _set(adapter, C_ATTN_A, adapter[C_ATTN_A][:1])
    with pytest.raises(
        CheckpointError,
        match=r"adapter: .*c_attn\.lora_A\.weight has shape \(1, 6\), but adapter_config\.json implies \(2, 6\)",
    ):
        rf.save_adapter(tmp_path, broken, lora, CONFIG, biases={})
    assert list(tmp_path.iterdir()) == []  # nothing was written
