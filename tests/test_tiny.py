"""The built-in tiny model (testbed plumbing): tokenizer, warm-start data and determinism."""
import dataclasses
import os
from types import SimpleNamespace

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
    observations = tiny.title_observations(world, RECIPE.topk)
    texts = tiny.warm_start_texts(world, RECIPE, 800, "habits", observations)
    trajectories = tiny.warm_start_data(world, tokenizer, RECIPE, 800, "habits", observations)
    drills = tiny.warm_start_data(world, tokenizer, RECIPE, 50, "drills")
    assert not any("I think I know this" in tokenizer.decode(ids) for ids, _ in drills)  # drills are ideal
    examples = {e.question: e for e in world.train}
    flaws = {"guess_year": [], "guess_other": [], "stop_early": [], "repeat": []}
    privileged_count = 0
    for (question, privileged, segments), (ids, mask) in zip(texts, trajectories):
        assert len(ids) == len(mask) and mask[-1] == 1 and ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(ids)
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert "<information>" not in trained and "Doc 1(Title:" not in trained  # observations are never trained
        assert "<answer>" in trained
        if "<search>" in trained:
            assert "\n\n<information>Doc 1(Title: " in text
        response = "".join(t for t, _ in segments)
        if privileged:  # the prompt carries a correct reference, and the trajectory follows it exactly
            privileged_count += 1
            assert privileged == opsd.TEACHER_CONTEXT.format(reference=response) and response in text
            assert f"<answer> {examples[question].golden_answers[0]} </answer>" in response
            continue
        example = examples[question]
        queries = [t.split("<search> ")[1].split(" </search>")[0] for t, trained in segments if "<search>" in t]
        kind = world.question_type(example)
        flaws["guess_year" if kind == "year" else "guess_other"].append(not queries)
        if queries:
            flaws["repeat"].append(len(queries) > 1 and queries[0] == queries[1])
            if len(world.plans[example.id]) == 2:
                flaws["stop_early"].append(len(set(queries)) == 1)
    rate = {k: sum(v) / len(v) for k, v in flaws.items()}
    # The flaws as the recipe draws them: years guessed ~90% of the time, other questions ~5%; two-hop questions
    # answered after one search ~80%; the first search made twice ~70%; ~30% privileged.
    assert rate["guess_year"] > 0.8 and rate["guess_other"] < 0.12, rate
    assert 0.65 < rate["stop_early"] < 0.92 and 0.6 < rate["repeat"] < 0.8, rate
    assert 0.2 < privileged_count / len(texts) < 0.4


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
def test_warm_started_model_leaves_room_for_each_effect():
    """The default recipe, built as `python train.py` builds it (cached under $SEARCH_E1_CACHE), in the bands the
    README states: greedy exact match on the synthetic test split within 20-50%, year questions mostly guessed and
    the rest searched, and room for each effect OPSD claims (tiny.probe): two-hop questions solved now and then
    under sampling, redundant searches, a teacher that reads its reference far better than the student does
    without, and a greedy start that weight noise of 1e-5 does not move."""
    cfg = train.parse_config([])
    world = data.make_world(**train.world_args(cfg))
    model, tokenizer = tiny.load_tiny(world, recipe=tiny.TinyRecipe(), log=lambda *_: None)
    retriever = train.make_retriever(cfg, world)
    episodes = rollout.rollout(model, tokenizer, world.test[:cfg.eval_limit], retriever,
                               train.rollout_config(cfg, seed=0, greedy=True))
    em = sum(e.reward for e in episodes) / len(episodes)
    assert 0.20 <= em <= 0.50, em
    year = [e.num_searches > 0 for e in episodes if world.question_type(e.example) == "year"]
    other = [e.num_searches > 0 for e in episodes if world.question_type(e.example) != "year"]
    assert sum(year) / len(year) < 0.5 < sum(other) / len(other)  # room for RL: searching pays on year questions
    probe = tiny.probe(model, tokenizer, world, retriever, train.rollout_config(cfg, seed=1))
    assert 0.01 <= probe["two_hop_sampled_em"] <= 0.25, probe
    assert 0.10 <= probe["redundant_sampled"] <= 0.90, probe
    assert probe["teacher_em"] >= probe["student_em"] + 0.20, probe
    assert probe["near_ties"] <= 0.35, probe
    # Not decided by near-ties: noise 10x larger than two machines' builds differ by leaves the start where it is.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-5 * torch.randn(p.shape, generator=generator))
    noisy = rollout.rollout(model, tokenizer, world.test[:cfg.eval_limit], retriever,
                            train.rollout_config(cfg, seed=0, greedy=True))
    assert sum(e.reward for e in noisy) / len(noisy) == em


def test_redundant_means_a_repeated_query_or_more_searches_than_hops():
    world = data.make_world(seed=0)
    one = next(e for e in world.test if len(world.plans[e.id]) == 1)
    two = next(e for e in world.test if len(world.plans[e.id]) == 2)

    def episode(example, *queries):
        return SimpleNamespace(example=example, queries=list(queries), num_searches=len(queries))

    first, second = (q for q, _ in world.plans[two.id])
    assert not tiny.is_redundant(episode(one), world) and not tiny.is_redundant(episode(one, "a"), world)
    assert tiny.is_redundant(episode(one, "a", "b"), world) and tiny.is_redundant(episode(two, first, first), world)
    assert not tiny.is_redundant(episode(two, first, second), world)
    assert tiny.is_redundant(episode(two, first, second, "c"), world)
