"""Deep text prompts: key/value prefixes (P-tuning v2) and replaced hidden states, the frozen
layers below the first prompted layer, and their cache."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import fedprompt
from fedprompt.config import load_config
from fedprompt.tasks.registry import build_experiment
from fedprompt.tasks.text.parts import build_prompt
from prompt_modules.attention_prefix import attention_prefixes
from prompt_modules.soft_prompt import DeepPrompt, PrefixPrompt, init_token_ids
from prompt_modules.text_classifier import LAYER_INPUT, TextPromptClassifier, VerbalizerHead

from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, tiny_backbone, tiny_run_config, write_keyword_dataset

TINY_LLAMA_GQA = {**TINY_LLAMA, "num_attention_heads": 4, "num_key_value_heads": 2}
TEXTS = ["the cat sat on the mat", "a", "stocks fell sharply after the report on rates"]
FAMILIES = {"bert": TINY_BERT, "gpt2": TINY_GPT2, "llama": TINY_LLAMA_GQA}
THREE_LAYERS = {
    "bert": {**TINY_BERT, "num_hidden_layers": 3},
    "gpt2": {**TINY_GPT2, "n_layer": 3},
    "llama": {**TINY_LLAMA_GQA, "num_hidden_layers": 3},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


def _classifier(backbone, prompt: torch.nn.Module) -> TextPromptClassifier:
    head = VerbalizerHead.from_label_words(backbone, [["bad", "awful"], ["good"]])
    template = "{text} It was" if backbone.is_decoder else "{text} It was [MASK]."
    return TextPromptClassifier(backbone, prompt, head, template).eval()


def _kv_shape(backbone) -> tuple[int, int]:
    keys = backbone.key_values(torch.tensor([1000]))
    return keys.shape[2], keys.shape[4]  # kv heads, head width


def _prefix(backbone, start: int, tokens: int, seed: int = 0) -> PrefixPrompt:
    heads, width = _kv_shape(backbone)
    g = torch.Generator().manual_seed(seed)
    return PrefixPrompt(torch.randn(backbone.num_layers - start, 2, heads, tokens, width, generator=g), start)


def _plain_hidden_states(backbone, clf, batch) -> tuple[torch.Tensor, ...]:
    """The unprompted model's hidden states at every layer input (and the last output), with the
    classifier's own layout (left padding and position ids for decoders)."""
    embedded = clf.embed_inputs(batch)
    mask = embedded.attention_mask
    out = backbone.model.base_model(
        inputs_embeds=embedded.embeds,
        attention_mask=mask,
        position_ids=clf._position_ids(mask),
        output_hidden_states=True,
    )
    return out.hidden_states, mask


# ----------------------------------------------------------------------------- prefix attention


def test_prefix_attention_equals_transformers_cache_with_the_prefix_as_past_keys(family):
    """All layers prefixed: the same as transformers' own cache holding the prefix as past keys and
    values (positions passed explicitly, the mask widened by the prefix), for each family."""
    backbone = tiny_backbone(FAMILIES[family])
    heads, width = _kv_shape(backbone)
    prefix = torch.randn(2, 2, heads, 3, width, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1000, 2000, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    embeds = backbone.embed(ids)
    with torch.no_grad(), attention_prefixes(backbone.model, {i: (p[0], p[1]) for i, p in enumerate(prefix)}):
        ours = backbone.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    cache = DynamicCache(config=backbone.model.config)
    for layer, p in enumerate(prefix):
        cache.update(p[0].expand(2, -1, -1, -1).clone(), p[1].expand(2, -1, -1, -1).clone(), layer)
    with torch.no_grad():
        reference = backbone.model.base_model(
            inputs_embeds=embeds,
            attention_mask=torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1),
            position_ids=positions,
            cache=cache,
        )
    real = mask.bool()
    torch.testing.assert_close(ours.last_hidden_state[real], reference.last_hidden_state[real])
    assert backbone.model.config._attn_implementation == "sdpa"  # restored after the block


def test_a_prefix_at_one_layer_changes_only_that_layers_attention():
    """BERT, prefix at layer 1 only: layer 1's self-attention output equals the hand computation
    softmax(q [K_p; K]ᵀ/√d + mask) [V_p; V] on its own input; layer 0 is untouched."""
    backbone = tiny_backbone(TINY_BERT)
    heads, width = _kv_shape(backbone)
    prefix = torch.randn(2, heads, 3, width, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(1000, 2000, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    attention = backbone.layers[1].attention.self
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        attention.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0])),
        attention.register_forward_hook(lambda m, args, out: seen.__setitem__("output", out[0])),
        backbone.layers[0].register_forward_hook(lambda m, args, out: seen.__setitem__("layer0", out)),
    ]
    try:
        with torch.no_grad():
            backbone.model.base_model(input_ids=ids, attention_mask=mask)
            plain_layer0 = seen["layer0"]
            with attention_prefixes(backbone.model, {1: (prefix[0], prefix[1])}):
                backbone.model.base_model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(seen["layer0"], plain_layer0, rtol=0, atol=0)

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, heads·width] -> [B, heads, L, width]
        return x.view(2, 6, heads, width).transpose(1, 2)

    h = seen["input"]
    q, k, v = split(attention.query(h)), split(attention.key(h)), split(attention.value(h))
    k = torch.cat([prefix[0].expand(2, -1, -1, -1), k], 2)
    v = torch.cat([prefix[1].expand(2, -1, -1, -1), v], 2)
    keep = torch.cat([torch.ones(2, 3), mask.float()], 1)[:, None, None, :]
    scores = q @ k.transpose(-1, -2) / math.sqrt(width) + (1 - keep) * -1e9
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, heads * width)
    torch.testing.assert_close(seen["output"], expected, rtol=1e-5, atol=1e-5)


def test_an_empty_prompt_is_the_unprompted_model(family):
    """m = 0: prefix and replace prompts from layer 1 give the unprompted model's logits."""
    backbone = tiny_backbone(THREE_LAYERS[family])
    heads, width = _kv_shape(backbone)
    plain = _classifier(backbone, DeepPrompt(torch.zeros(3, 0, 32), 0))
    batch = plain.encode_texts(TEXTS)
    embedded = plain.embed_inputs(batch)
    with torch.no_grad():
        if backbone.is_decoder:
            out = backbone.model(
                inputs_embeds=embedded.embeds,
                attention_mask=embedded.attention_mask,
                position_ids=plain._position_ids(embedded.attention_mask),
            ).logits[:, -1]
        else:
            hits = (embedded.input_ids == backbone.tokenizer.mask_token_id).int().argmax(1)
            out = backbone.model(inputs_embeds=embedded.embeds, attention_mask=embedded.attention_mask).logits
            out = out[torch.arange(3), hits]
        expected = plain.head(out)
        for prompt in (
            PrefixPrompt(torch.zeros(2, 2, heads, 0, width), 1),
            DeepPrompt(torch.zeros(2, 0, 32), 1),
        ):
            torch.testing.assert_close(_classifier(backbone, prompt)(batch), expected)


@pytest.mark.parametrize("mode", ["prefix", "replace"])
def test_layers_below_the_start_layer_compute_the_unprompted_model(family, mode):
    """Every layer below k = 2 sees the unprompted model's states (the prompt positions enter at k in
    replace mode, the sequence never grows in prefix mode); layer k does see the prompt."""
    backbone = tiny_backbone(THREE_LAYERS[family])
    prompt = _prefix(backbone, 2, 3) if mode == "prefix" else DeepPrompt(torch.randn(1, 3, 32), 2)
    clf = _classifier(backbone, prompt)
    batch = clf.encode_texts(TEXTS)
    plain, mask = _plain_hidden_states(backbone, clf, batch)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [  # forward hooks see a layer's input as its forward did, after every pre-hook
        layer.register_forward_hook(
            lambda m, args, kwargs, out, i=i: inputs.__setitem__(
                i, args[0] if args else kwargs["hidden_states"]
            ),
            with_kwargs=True,
        )
        for i, layer in enumerate(backbone.layers)
    ]
    try:
        with torch.no_grad():
            prompted = clf(batch)
    finally:
        for hook in hooks:
            hook.remove()
    real = mask.bool()
    for layer in (0, 1):
        torch.testing.assert_close(inputs[layer][real], plain[layer][real])
    arrived = inputs[2]
    if mode == "replace":  # k's input: the unprompted states with the 3 prompt positions inserted
        pos = clf.prompt_position
        assert arrived.shape[1] == plain[2].shape[1] + 3
        torch.testing.assert_close(arrived[:, pos : pos + 3], prompt.layers[0].expand(3, -1, -1))
        arrived = torch.cat([arrived[:, :pos], arrived[:, pos + 3 :]], 1)
    torch.testing.assert_close(arrived[real], plain[2][real])
    with torch.no_grad():
        baseline = _classifier(backbone, DeepPrompt(torch.zeros(1, 0, 32), 2))(batch)
    assert not torch.allclose(prompted, baseline)


# ----------------------------------------------------------------------------- the below-k cache


@pytest.mark.parametrize("mode", ["prefix", "replace"])
def test_cached_layer_inputs_give_the_same_logits_and_gradients(family, mode):
    backbone = tiny_backbone(THREE_LAYERS[family])
    prompt = _prefix(backbone, 1, 2) if mode == "prefix" else DeepPrompt(torch.randn(2, 2, 32), 1)
    clf = _classifier(backbone, prompt)
    batch = clf.encode_texts(TEXTS)
    cached = {**batch, LAYER_INPUT: clf.layer_inputs(batch)}
    assert cached[LAYER_INPUT].shape == (*batch["input_ids"].shape, 32)
    results = []
    for inputs in (batch, cached):
        prompt.zero_grad()
        logits = clf(inputs)
        logits.square().sum().backward()
        results.append((logits.detach(), next(prompt.parameters()).grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


def test_cached_layer_inputs_are_trimmed_and_left_aligned_with_their_batch():
    """Cached states travel through TensorData batches (trimmed to the batch's width) and, for a
    decoder, are left-aligned as its ids are: the logits equal those of the uncached batch."""
    from fedprompt.training.batching import TensorData

    backbone = tiny_backbone(THREE_LAYERS["llama"])
    clf = _classifier(backbone, DeepPrompt(torch.randn(2, 2, 32), 1))
    encoded = clf.encode_texts(TEXTS)
    data = TensorData({**encoded, LAYER_INPUT: clf.layer_inputs(encoded), "labels": torch.zeros(3)})
    with torch.no_grad():
        for index in ([1], [0, 1]):  # "a" alone is trimmed to its own width
            cached = next(data.subset(index).batches(8))
            assert (
                cached[LAYER_INPUT].shape[1] == cached["input_ids"].shape[1] < encoded["input_ids"].shape[1]
            )
            plain = {k: v for k, v in cached.items() if k != LAYER_INPUT}
            torch.testing.assert_close(clf(cached), clf(plain), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl", n=150)


@pytest.mark.parametrize("mode", ["prefix", "replace"])
def test_training_with_the_cache_gives_the_same_prompt(keyword_file, mode):
    runs = []
    for cache in (True, False):
        config = tiny_run_config(
            keyword_file,
            backbone={"random_config": {**TINY_BERT, "num_hidden_layers": 3, "initializer_range": 0.3}},
            prompt={"kind": "deep", "mode": mode, "start_layer": 2, "cache_frozen_layers": cache},
            federation={"rounds": 2, "min_clients": 2},
        )
        experiment = build_experiment(load_config(config))
        for data in (experiment.test_data, *(c.train_data for c in experiment.clients.values())):
            assert (LAYER_INPUT in data.tensors) == cache
        runs.append(fedprompt.run(config, write=False))
    ((name, cached),) = runs[0].final_state.items()
    torch.testing.assert_close(cached, runs[1].final_state[name], rtol=1e-4, atol=1e-5)
    assert runs[0].metric("global_accuracy") == pytest.approx(runs[1].metric("global_accuracy"), abs=0.01)


# ----------------------------------------------------------------------------- configuration


def test_prefix_init_is_the_frozen_models_own_keys_and_values_of_sampled_tokens():
    """init vocab: the prefix of layer ℓ ≥ k is the model's keys and values of m tokens drawn from the
    vocabulary (Li & Liang's initialisation with real-word activations); random: N(0, init_std²)."""
    backbone = tiny_backbone(THREE_LAYERS["llama"])
    config = load_config(None, ["prompt.kind=deep", "prompt.start_layer=1", "prompt.num_tokens=4"]).prompt
    assert config.mode == "prefix"
    prompt = build_prompt(config, backbone, seed=7)
    assert isinstance(prompt, PrefixPrompt) and prompt.start_layer == 1
    from fedprompt.seeding import derive_seed, torch_generator

    ids = init_token_ids(
        backbone.embedding_matrix.shape[0],
        4,
        "vocab",
        generator=torch_generator(derive_seed(7, "prompt-init")),
        excluded_ids=backbone.tokenizer.all_special_ids,
    )
    torch.testing.assert_close(prompt.prefix.detach(), backbone.key_values(ids)[1:])
    assert prompt.prefix.shape == (2, 2, 2, 4, 8)  # layers 1..2, keys+values, 2 kv heads, m, width
    random = build_prompt(config.model_copy(update={"init": "random", "init_std": 0.5}), backbone, seed=7)
    assert abs(float(random.prefix.detach().std()) - 0.5) < 0.1
    replace = build_prompt(config.model_copy(update={"mode": "replace"}), backbone, seed=7)
    assert isinstance(replace, DeepPrompt) and replace.layers.shape == (2, 4, 32)


def test_smollm2_deep_config_uses_prefixes():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "smollm2-deep-prompt.yaml")
    assert config.prompt.kind == "deep" and config.prompt.mode == "prefix" and config.prompt.start_layer == 20
    assert config.prompt.cache_frozen_layers
