"""The built-in tiny model (testbed plumbing): tokenizer, warm-start data and determinism."""
import dataclasses

import torch

import data
import opsd
import rollout
import tiny

RECIPE = dataclasses.replace(tiny.TinyRecipe(), num_trajectories=24, epochs=1, batch_size=8)


def test_warm_start_is_deterministic_under_a_seed():
    world = data.make_world(seed=0)
    models = []
    for _ in range(2):
        tokenizer = tiny.build_tokenizer(world, RECIPE)
        model = tiny.build_model(tokenizer, RECIPE)
        losses = tiny.supervised_pass(model, tiny.warm_start_data(world, tokenizer, RECIPE), RECIPE, log=lambda *_: None)
        models.append((model.state_dict(), losses))
    (a, la), (b, lb) = models
    assert la == lb
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert la[-1] < la[0]  # it learned something


def test_trajectories_are_in_the_rollout_format_with_masks_from_provenance():
    world = data.make_world(seed=0)
    tokenizer = tiny.build_tokenizer(world, RECIPE)
    instruction = rollout.INSTRUCTION.split("{question}")[0]
    assert len(tokenizer(instruction, add_special_tokens=False).input_ids) == 1  # the boilerplate is one token
    for ids, mask in tiny.warm_start_data(world, tokenizer, RECIPE):
        assert len(ids) == len(mask) and mask[-1] == 1 and ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(ids)
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert "<information>" not in trained and "Doc 1(Title:" not in trained  # observations are never trained
        assert "<answer>" in trained
        if "<search>" in trained:
            assert "\n\n<information>Doc 1(Title: " in text
        if opsd.TEACHER_CONTEXT.split("{reference}")[0] in text:  # privileged prompts follow their reference
            assert "I think I know this" not in trained


def test_cache_key_changes_with_recipe_and_world():
    base = tiny.recipe_key(RECIPE, {"seed": 0})
    assert base == tiny.recipe_key(RECIPE, {"seed": 0})
    assert base != tiny.recipe_key(dataclasses.replace(RECIPE, lr=1e-3), {"seed": 0})
    assert base != tiny.recipe_key(RECIPE, {"seed": 1})
