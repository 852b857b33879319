"""The built-in tiny model (testbed plumbing): tokenizer, warm-start data and determinism."""
import dataclasses
import os

import pytest
import torch

import data
import opsd
import rollout
import tiny
import train

RECIPE = dataclasses.replace(tiny.TinyRecipe(), drill_steps=3, flawed_steps=3, batch_size=8)


def test_warm_start_is_deterministic_under_a_seed():
    world = data.make_world(seed=0)
    models = []
    for _ in range(2):
        tokenizer = tiny.build_tokenizer(world, RECIPE)
        model = tiny.build_model(tokenizer, RECIPE)
        losses = tiny.warm_start(model, world, tokenizer, RECIPE, log=lambda *_: None)
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
    trajectories = tiny.warm_start_data(world, tokenizer, RECIPE, 400, flawed=True)
    drills = tiny.warm_start_data(world, tokenizer, RECIPE, 50, flawed=False)
    assert not any("I think I know this" in tokenizer.decode(ids) for ids, _ in drills)  # drills are ideal
    guessed = {True: [], False: []}
    for ids, mask in trajectories:
        assert len(ids) == len(mask) and mask[-1] == 1 and ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(ids)
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert "<information>" not in trained and "Doc 1(Title:" not in trained  # observations are never trained
        assert "<answer>" in trained
        if "<search>" in trained:
            assert "\n\n<information>Doc 1(Title: " in text
        if opsd.TEACHER_CONTEXT.split("{reference}")[0] in text:  # privileged prompts follow their reference
            assert "I think I know this" not in trained
        else:
            guessed["which year" in text].append("I think I know this" in trained)
    # The flaws as the recipe draws them: years guessed ~90% of the time, other questions ~5%.
    assert sum(guessed[True]) / len(guessed[True]) > 0.75 and sum(guessed[False]) / len(guessed[False]) < 0.15


def test_cache_key_covers_what_shapes_the_model_and_nothing_else(monkeypatch):
    world = data.make_world(seed=0)
    base = tiny.recipe_key(RECIPE, world)
    assert base == tiny.recipe_key(RECIPE, data.make_world(seed=0))  # the same world built again
    assert base != tiny.recipe_key(dataclasses.replace(RECIPE, lr=1e-3), world)  # the recipe
    assert base != tiny.recipe_key(RECIPE, data.make_world(seed=1))  # the world's content
    # the strings the model learns to copy: the teacher context, the instruction, the observation format
    for module, name, value in [(opsd, "TEACHER_CONTEXT", "\nReference:\n{reference}\n"),
                                (rollout, "INSTRUCTION", rollout.INSTRUCTION.replace("Answer", "Reply")),
                                (rollout, "OBSERVATION_OPEN", "\n<information>")]:
        with monkeypatch.context() as m:
            m.setattr(module, name, value)
            assert tiny.recipe_key(RECIPE, world) != base, name
    assert tiny.recipe_key(RECIPE, world) == base
    # module sources are not part of it (a comment edit in opsd.py used to rebuild everyone's model)
    import inspect
    monkeypatch.setattr(inspect, "getsource", lambda *_: "edited")
    assert tiny.recipe_key(RECIPE, world) == base


def test_numbers_are_split_into_digits_and_names_are_single_tokens():
    world = data.make_world(seed=0)
    tokenizer = tiny.build_tokenizer(world, RECIPE)
    assert tokenizer.tokenize(" 1946") == ["Ġ", "1", "9", "4", "6"]  # as Qwen2 splits numbers
    names = [entity for plan in world.plans.values() for entity, _ in plan]
    assert all(len(tokenizer.tokenize(" " + word)) == 1 for name in names for word in name.split())


@pytest.mark.skipif(os.environ.get("SEARCH_E1_SKIP_SLOW") == "1", reason="builds the full tiny model (~3 min)")
def test_warm_started_model_lands_in_the_target_band():
    """The default recipe, built as `python train.py` builds it (cached under $SEARCH_E1_CACHE): greedy exact match
    on the synthetic test split within 20-50%, with year questions mostly guessed and the rest searched."""
    cfg = train.parse_config([])
    world = data.make_world(**train.world_args(cfg))
    model, tokenizer = tiny.load_tiny(world, recipe=tiny.TinyRecipe(), log=lambda *_: None)
    retriever = train.make_retriever(cfg, world)
    episodes = rollout.rollout(model, tokenizer, world.test[:cfg.eval_limit], retriever,
                               train.rollout_config(cfg, seed=0, greedy=True))
    em = sum(e.reward for e in episodes) / len(episodes)
    assert 0.20 <= em <= 0.50, em
    year = [e.num_searches > 0 for e in episodes if e.example.golden_answers[0].isdigit()]
    other = [e.num_searches > 0 for e in episodes if not e.example.golden_answers[0].isdigit()]
    assert sum(year) / len(year) < 0.5 < sum(other) / len(other)  # room for RL: searching pays on year questions
