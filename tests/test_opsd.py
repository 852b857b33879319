"""opsd.py: pair mining, the teacher prompt, one update against the materialised loss, distributed equivalence,
and the learning signal: the teacher's privileged context is what the student learns from."""
import copy
import random
import types

import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import opsd
import rollout
from data import Example
from opsd import TEACHER_CONTEXT, Pair, mine_pairs, opsd_kl, opsd_step, teacher_prompt_ids
from rollout import Episode, build_prompt

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ([f"q{i}" for i in range(16)] + [f"r{i}" for i in range(16)] + [f"w{i}" for i in range(24)]
         + ["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>", "(documents", "omitted)"])


def tiny_tokenizer():
    """Word-level: question words q*, reference words r*, response words w*; the fixed texts are one token each."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = ["[UNK]", *specials, "user", "assistant", "?", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.add_tokens([AddedToken(rollout.INSTRUCTION.split("{question}")[0], normalized=False),
                    AddedToken(TEACHER_CONTEXT.split("{reference}")[0], normalized=False), AddedToken("?")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(vocab, seed=0, initializer_range=0.3, tied=False):
    """A random Qwen2 with a wide init: peaked, context-dependent next-token distributions."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                                        initializer_range=initializer_range))


def make_cfg(**kw):
    return types.SimpleNamespace(**{**dict(opsd_clip=1.0, micro_batch_size=64, max_grad_norm=None, chunk_size=7,
                                           temperature=1.0, opsd_students="most_different"), **kw})


def episode(tokenizer, q, words, reward, searches=0, group=None, mask=None):
    ids = tokenizer.convert_tokens_to_ids(words.split())
    prompt = tokenizer(build_prompt(tokenizer, f"q{q}"), add_special_tokens=False).input_ids
    return Episode(example=Example(str(q), f"q{q}", ["a"]), group_id=q if group is None else group, prompt_ids=prompt,
                   response_ids=ids, loss_mask=mask or [1] * len(ids), reward=reward, num_searches=searches)


# ---------------------------------------------------------------- pairs


def test_reference_is_the_correct_episode_with_fewest_searches_then_tokens_then_first():
    tk = tiny_tokenizer()
    group = [episode(tk, 0, "w1 w2", 0.0, searches=0),  # incorrect: never the reference
             episode(tk, 0, "w1 w2 w3 w4", 1.0, searches=2),
             episode(tk, 0, "w1 w2 w3", 1.0, searches=1),
             episode(tk, 0, "w5 w6 w7", 1.0, searches=1),  # same searches and length as [2]: [2] comes first
             episode(tk, 0, "w1", 1.0, searches=3)]
    pairs, _ = mine_pairs(group, students="all")
    assert all(p.reference is group[2] for p in pairs)
    assert [p.student for p in pairs] == [group[0], group[1], group[3], group[4]]
    group[3].response_ids = group[3].response_ids[:2]  # now shorter: it wins the tie on searches
    group[3].loss_mask = group[3].loss_mask[:2]
    pairs, _ = mine_pairs(group, students="all")
    assert pairs[0].reference is group[3]


def test_student_selection_modes_and_skipped_groups():
    tk = tiny_tokenizer()
    episodes = [
        episode(tk, 0, "w1 w2 w3", 1.0),  # reference of group 0
        episode(tk, 0, "w1 w2 w4", 0.0),  # incorrect, Jaccard distance 1 - 2/4 = 0.5
        episode(tk, 0, "w7 w8 w9", 0.0),  # incorrect, distance 1: the most different
        episode(tk, 0, "w5 w6 w5", 1.0),  # correct and distance 1: not chosen while incorrect siblings exist
        episode(tk, 1, "w1", 0.0), episode(tk, 1, "w2", 0.0),  # no correct episode: skipped
        episode(tk, 2, "w1 w2", 1.0), episode(tk, 2, "w1 w3", 1.0), episode(tk, 2, "w9 w8", 1.0),  # all correct
        episode(tk, 3, "w1", 1.0),  # alone: a reference without students
    ]
    pairs, stats = mine_pairs(episodes, students="most_different")
    assert [(p.student, p.reference) for p in pairs] == [(episodes[2], episodes[0]), (episodes[8], episodes[6])]
    assert stats == {"pairs": 2.0, "groups": 4.0, "skipped_groups": 1.0, "reference_searches": 0.0,
                     "incorrect_students": 0.5}
    pairs, _ = mine_pairs(episodes, students="incorrect")
    assert [p.student for p in pairs] == [episodes[1], episodes[2]]
    pairs, _ = mine_pairs(episodes, students="all")
    assert [p.student for p in pairs] == [episodes[1], episodes[2], episodes[3], episodes[7], episodes[8]]
    # retrieved tokens (loss mask 0) do not count in the distance
    a = episode(tk, 5, "w1 w2 w3", 1.0)
    b = episode(tk, 5, "w1 w9 w3", 0.0, mask=[1, 0, 1])
    assert opsd.distance(a, b) == pytest.approx(1 - 2 / 3)
    # a lower threshold makes partial rewards correct
    pairs, stats = mine_pairs([episode(tk, 0, "w1", 0.5), episode(tk, 0, "w2", 0.0)], threshold=0.5)
    assert len(pairs) == 1 and stats["skipped_groups"] == 0
    with pytest.raises(ValueError, match="students"):
        mine_pairs(episodes, students="random")


def test_teacher_prompt_is_the_normal_prompt_plus_the_reference_trajectory():
    tk = tiny_tokenizer()
    reference = episode(tk, 3, "<search> r3 </search> w4 <answer> r3 </answer> <|im_end|>", 1.0)
    student = episode(tk, 3, "w1 w2", 0.0)
    ids = teacher_prompt_ids(tk, Pair(student=student, reference=reference))
    privileged = TEACHER_CONTEXT.format(reference="<search> r3 </search> w4 <answer> r3 </answer>")
    assert ids == tk(build_prompt(tk, "q3", privileged=privileged), add_special_tokens=False).input_ids
    tokens = tk.convert_ids_to_tokens(ids)
    # the user turn ends with question, context and reference; the reference's end-of-turn token is not there
    context = TEACHER_CONTEXT.split("{reference}")[0]
    user_turn = tokens[:tokens.index("<|im_end|>")]
    assert user_turn[-10:] == ["q3", "?", context, "<search>", "r3", "</search>", "w4", "<answer>", "r3", "</answer>"]
    assert tokens.count("<|im_end|>") == 1 and tokens[-2:] == ["<|im_start|>", "assistant"]
    # without those 8 tokens it is the student's prompt
    k = tokens.index(context)
    assert ids[:k] + ids[k + 8:] == student.prompt_ids


def test_teacher_sequence_is_bounded_documents_cut_first_then_the_pair_skipped():
    tk = tiny_tokenizer()
    words = "<search> r3 </search> <information> r1 r2 r4 r5 r6 r7 </information> w4 <answer> r3 </answer>"
    mask = [1, 1, 1] + [0] * 8 + [1, 1, 1, 1]  # the observation was injected: loss mask 0
    reference = episode(tk, 3, words, 1.0, searches=1, mask=mask)
    student = episode(tk, 3, "w1 w2 w3", 0.0)
    pair = Pair(student=student, reference=reference)
    assert opsd.reference_text(tk, reference, keep_documents=False) == (
        "<search> r3 </search>" + rollout.OBSERVATION_OPEN + opsd.OMITTED + rollout.OBSERVATION_CLOSE
        + "w4 <answer> r3 </answer>")
    full, cut = teacher_prompt_ids(tk, pair), teacher_prompt_ids(tk, pair, keep_documents=False)
    assert len(cut) < len(full)
    n = len(student.response_ids)
    for max_tokens, expected, counts in [(len(full) + n, full, (0, 0)), (len(full) + n - 1, cut, (1, 0)),
                                         (len(cut) + n, cut, (1, 0)), (len(cut) + n - 1, None, (0, 1))]:
        kept, stats = opsd.bound_teacher_prompts([pair], tk, max_tokens)
        assert (stats["cut_references"], stats["skipped_long_pairs"]) == counts
        assert [p.teacher_ids for p in kept] == ([expected] if expected else [])
        for p in kept:
            assert len(p.teacher_ids) + n <= max_tokens and teacher_prompt_ids(tk, p) == p.teacher_ids


def test_opsd_phase_mines_bounds_and_lowers_the_kl_on_its_pairs():
    tk = tiny_tokenizer()
    g = random.Random(1)
    episodes = []
    for q in range(6):
        episodes.append(episode(tk, q, " ".join([f"r{q}"] * 3 + ["w1"]), 1.0))
        episodes += [episode(tk, q, " ".join(f"w{g.randrange(24)}" for _ in range(5)), 0.0) for _ in range(3)]
    episodes += [episode(tk, 7, "w1 w2", 0.0), episode(tk, 7, "w3", 0.0)]  # no correct sibling: skipped
    policy = tiny_model(len(tk))
    before = copy.deepcopy(policy.state_dict())
    cfg = make_cfg(opsd_students="all", opsd_max_tokens=None, max_context_tokens=1000, opsd_lr=3e-2, lr=1e-6,
                   weight_decay=0.0, opsd_epochs=3, opsd_batch_size=6, max_grad_norm=1.0, opsd_lora_rank=0,
                   opsd_lora_alpha=None, bf16=False, opsd_diagnostic_pairs=0, opsd_reference="sibling")
    metrics = opsd.opsd_phase(policy, episodes, tk, cfg, seed=0)
    assert (metrics["opsd/pairs"], metrics["opsd/groups"], metrics["opsd/skipped_groups"]) == (18, 7, 1)
    assert metrics["opsd/optimizer_steps"] == 3 * 3 and metrics["opsd/skipped_long_pairs"] == 0
    assert metrics["opsd/kl_after"] < 0.7 * metrics["opsd/kl_before"]
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    # a bound below every teacher sequence: every pair skipped, counted, and no step taken
    short = tiny_model(len(tk))
    metrics = opsd.opsd_phase(short, episodes, tk, make_cfg(**{**vars(cfg), "opsd_max_tokens": 5}), seed=0)
    assert metrics["opsd/pairs"] == 0 and metrics["opsd/skipped_long_pairs"] == 18
    assert metrics["opsd/optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(short.state_dict().values(), tiny_model(len(tk)).state_dict().values()))


# ---------------------------------------------------------------- one update


def make_pairs(tk, seed=0, n=5):
    g = random.Random(seed)
    pairs = []
    for q in range(n):
        ref = episode(tk, q, " ".join([f"r{q}"] * 3 + [f"w{g.randrange(24)}"]), 1.0)
        length = g.randrange(3, 8)
        mask = [1] * length
        mask[1] = 0  # a retrieved token inside the response
        student = episode(tk, q, " ".join(f"w{g.randrange(24)}" for _ in range(length)), 0.0, mask=mask)
        pairs.append(Pair(student=student, reference=ref))
    return pairs


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_opsd_step_gradient_is_that_of_the_materialised_loss(clip, tied):
    tk = tiny_tokenizer()
    pairs = make_pairs(tk)
    model = tiny_model(len(tk), tied=tied)
    teacher = tiny_model(len(tk), seed=1, tied=tied).requires_grad_(False)  # a different teacher: a non-trivial KL
    cfg = make_cfg(opsd_clip=clip, micro_batch_size=2)  # accumulation over 3 micro-batches
    student = copy.deepcopy(model)
    before = [p.detach().clone() for p in student.parameters()]
    metrics = opsd_step(student, teacher, torch.optim.SGD(student.parameters(), lr=1.0), pairs, tk, cfg)
    update = [b - p.detach() for b, p in zip(before, student.parameters())]

    def response_logp(m, prompt, e):  # (len(response), V) log-probs from materialised logits, unpadded
        ids = torch.tensor([prompt + e.response_ids])
        return F.log_softmax(m(input_ids=ids).logits[0, len(prompt) - 1:-1], -1)

    total, unclipped, tokens = 0.0, 0.0, 0
    for p in pairs:
        logp = response_logp(model, p.student.prompt_ids, p.student)
        with torch.no_grad():
            logp_t = response_logp(teacher, teacher_prompt_ids(tk, p), p.student)
        for t, keep in enumerate(p.student.loss_mask):
            if keep:
                terms = F.kl_div(logp[t], logp_t[t], log_target=True, reduction="none")  # (V,)
                total = total + (terms.clamp(max=clip) if clip is not None else terms).sum()
                unclipped += float(terms.detach().sum())
                tokens += 1
    loss = total / tokens
    model.zero_grad()
    loss.backward()
    for ours, p in zip(update, model.parameters()):
        torch.testing.assert_close(ours, p.grad, rtol=1e-4, atol=1e-6)
    assert metrics["opsd/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["opsd/kl"] == pytest.approx(unclipped / tokens, rel=1e-5)
    assert metrics["opsd/loss_tokens"] == tokens == sum(len(p.student.loss_mask) - 1 for p in pairs)
    assert opsd_kl(model, teacher, pairs, tk, cfg)["all"] == pytest.approx(unclipped / tokens, rel=1e-5)
    if clip is not None:
        assert metrics["opsd/loss"] < metrics["opsd/kl"]


def test_empty_pairs_and_non_finite_loss_take_no_step():
    tk = tiny_tokenizer()
    model, teacher = tiny_model(len(tk)), tiny_model(len(tk), seed=1).requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    metrics = opsd_step(model, teacher, opt, [], tk, make_cfg())
    assert metrics["opsd/loss_tokens"] == 0 and metrics["opsd/skipped_steps"] == 0
    assert metrics["opsd/optimizer_steps"] == 0  # nothing to learn is no step, as in grpo_step
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] = float("nan")
    metrics = opsd_step(model, teacher, opt, make_pairs(tk), tk, make_cfg(max_grad_norm=1.0))
    assert metrics["opsd/skipped_steps"] == 1 and metrics["opsd/optimizer_steps"] == 0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters())) and not opt.state


def _distributed_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    tk = tiny_tokenizer()
    pairs = make_pairs(tk, n=3)
    model, teacher = tiny_model(len(tk)), tiny_model(len(tk), seed=1).requires_grad_(False)
    mine = pairs if rank == 0 else []  # uneven: rank 1 has nothing this step, and still joins every collective
    metrics = opsd_step(model, teacher, torch.optim.SGD(model.parameters(), lr=1.0), mine, tk, make_cfg())
    kl = opsd_kl(model, teacher, mine, tk, make_cfg())["all"]
    if rank == 1:
        torch.save({"params": [p.detach() for p in model.parameters()], "metrics": metrics, "kl": kl}, out_file)
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    torch.multiprocessing.start_processes(_distributed_worker, nprocs=2, start_method="fork",
                                          args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")))
    got = torch.load(tmp_path / "out.pt")
    tk = tiny_tokenizer()
    model, teacher = tiny_model(len(tk)), tiny_model(len(tk), seed=1).requires_grad_(False)
    metrics = opsd_step(model, teacher, torch.optim.SGD(model.parameters(), lr=1.0), make_pairs(tk, n=3), tk,
                        make_cfg())
    for a, b in zip(got["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    for k, v in metrics.items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-5), k
    assert got["kl"] == pytest.approx(opsd_kl(model, teacher, make_pairs(tk, n=3), tk, make_cfg())["all"], rel=1e-5)


# ---------------------------------------------------------------- learning


def test_opsd_learns_from_the_privileged_context():
    """Held-out KL(teacher || student) falls with OPSD; with mismatched references in training it falls less.

    Each question q has a reference whose tokens (r_q) appear nowhere else, so the teacher's distributions depend
    on q through the reference. Training pairs and held-out pairs are different student responses to the same
    questions; the held-out KL is always measured against the teacher reading the right reference. The control
    trains against a teacher reading another question's reference: it learns the template's generic shift but
    not the per-question one.
    """
    tk = tiny_tokenizer()
    g = random.Random(0)
    num_q, num_students, length = 8, 16, 6
    episodes = []
    for q in range(num_q):
        episodes.append(episode(tk, q, " ".join([f"r{q}"] * 4 + [f"w{g.randrange(24)}" for _ in range(2)]), 1.0))
        episodes += [episode(tk, q, " ".join(f"w{g.randrange(24)}" for _ in range(length)), 0.0, searches=1)
                     for _ in range(num_students)]
    pairs, stats = mine_pairs(episodes, students="all")
    assert stats["pairs"] == num_q * num_students
    train = [p for i, p in enumerate(pairs) if i % num_students < num_students // 2]
    held_out = [p for i, p in enumerate(pairs) if i % num_students >= num_students // 2]
    references = {p.reference.group_id: p.reference for p in pairs}
    mismatched = [Pair(p.student, references[(p.reference.group_id + 3) % num_q]) for p in train]

    base = tiny_model(len(tk))
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    cfg = make_cfg(max_grad_norm=1.0, chunk_size=64)
    before = opsd_kl(base, teacher, held_out, tk, cfg)["all"]
    after = {}
    for name, train_pairs in [("opsd", train), ("control", mismatched)]:
        student = copy.deepcopy(base)
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        for _ in range(30):
            metrics = opsd_step(student, teacher, opt, train_pairs, tk, cfg)
            assert metrics["opsd/skipped_steps"] == 0
        after[name] = opsd_kl(student, teacher, held_out, tk, cfg)["all"]
    assert before > 0.5  # a real gap to close
    assert after["opsd"] < 0.6 * before
    assert after["control"] > after["opsd"] + 0.1 * before


# ---------------------------------------------------------------- LoRA: the paper's teacher, no copy of the weights


def lora_setting(tk, **kw):
    g = random.Random(1)
    episodes = []
    for q in range(6):
        episodes.append(episode(tk, q, " ".join([f"r{q}"] * 3 + ["w1"]), 1.0))
        episodes += [episode(tk, q, " ".join(f"w{g.randrange(24)}" for _ in range(5)), 0.0) for _ in range(3)]
    cfg = make_cfg(**{**dict(opsd_students="all", opsd_max_tokens=None, max_context_tokens=1000, opsd_lr=3e-2,
                             lr=1e-6, weight_decay=0.0, opsd_epochs=3, opsd_batch_size=6, max_grad_norm=1.0,
                             opsd_lora_rank=4, opsd_lora_alpha=None, bf16=False, opsd_diagnostic_pairs=0,
                             opsd_reference="sibling"), **kw})
    return episodes, cfg


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in the process (parameters, gradients, optimizer states...)."""
    import gc
    import warnings

    storages = {}
    with warnings.catch_warnings():  # (isinstance on some module objects warns about deprecated names)
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                st = obj.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("tied", [False, True])
def test_lora_phase_teacher_is_the_pre_phase_policy_merge_is_base_plus_scaled_adapter_and_no_copy(monkeypatch, tied):
    pytest.importorskip("peft", reason="LoRA OPSD needs PEFT (requirements-lora.txt)")
    tk = tiny_tokenizer()
    episodes, cfg = lora_setting(tk, opsd_lora_rank=1)  # (rank 1: the adapter stays small next to this tiny model)
    policy = tiny_model(len(tk), tied=tied)
    pristine = copy.deepcopy(policy).eval()
    params_before = {name: p for name, p in policy.named_parameters()}
    base_numel = sum(p.numel() for p in policy.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    baseline = live_tensor_bytes()
    seen = {"steps": 0, "growth": 0}
    real_step, real_merge = opsd.opsd_step, opsd.merge_adapter

    def checking_step(student, teacher, optimizer, pairs, tokenizer, cfg):
        metrics = real_step(student, teacher, optimizer, pairs, tokenizer, cfg)
        assert teacher is student  # the teacher is the student with its adapter off: one model
        adapter = sum(p.numel() for p in student.parameters() if p.requires_grad)
        assert adapter == 1 * sum(m.in_features + m.out_features for m in pristine.modules()
                                  if isinstance(m, torch.nn.Linear) and m is not pristine.lm_head)  # all but the head
        assert sum(p.numel() for p in student.parameters()) == base_numel + adapter  # nothing else was added
        seen["growth"] = max(seen["growth"], live_tensor_bytes() - baseline)
        # the teacher's hidden states are the pre-phase policy's, bit for bit, after every step
        s_batch, t_batch = next(opsd._pair_batches(pairs, tokenizer, 64, "cpu"))
        with torch.no_grad(), opsd.as_teacher(teacher) as t:
            h, w = opsd.response_hidden(t, t_batch)
        with torch.no_grad():
            h0, w0 = opsd.response_hidden(pristine, t_batch)
        assert torch.equal(h, h0) and torch.equal(w, w0)
        seen["steps"] += 1
        return metrics

    def checking_merge(peft_model, trainable):
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        expected = layer.base_layer.weight.detach() + 2.0 * (layer.lora_B["default"].weight @  # alpha / rank
                                                                  layer.lora_A["default"].weight).detach()
        assert layer.lora_B["default"].weight.abs().sum() > 0  # the adapter learned something
        merged = real_merge(peft_model, trainable)
        torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight.detach(), expected,
                                   rtol=1e-6, atol=1e-7)
        return merged

    monkeypatch.setattr(opsd, "opsd_step", checking_step)
    monkeypatch.setattr(opsd, "merge_adapter", checking_merge)
    metrics = opsd.opsd_phase(policy, episodes, tk, cfg, seed=0)
    assert seen["steps"] == metrics["opsd/optimizer_steps"] == 9
    assert seen["growth"] < 0.5 * model_bytes  # adapter, its gradients and AdamW: no second set of weights
    assert metrics["opsd/kl_after"] < 0.8 * metrics["opsd/kl_before"]  # the KL falls over the phase
    # the policy is the same object with the same parameter tensors (the GRPO optimizer holds them), trainable again
    assert dict(policy.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[n] and p.requires_grad for n, p in policy.named_parameters())
    assert not any("lora" in n for n, _ in policy.named_modules())
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), pristine.parameters()))


def test_full_fine_tuning_phase_copies_the_weights_for_its_teacher(monkeypatch):
    """The control for the LoRA test above: without an adapter the teacher is a second copy of the weights."""
    tk = tiny_tokenizer()
    episodes, cfg = lora_setting(tk, opsd_lora_rank=0)
    policy = tiny_model(len(tk))
    model_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    baseline, seen = live_tensor_bytes(), {}
    real_step = opsd.opsd_step

    def measuring_step(student, teacher, *args):
        metrics = real_step(student, teacher, *args)
        seen["growth"] = max(seen.get("growth", 0), live_tensor_bytes() - baseline)
        assert teacher is not student and not any(p.requires_grad for p in teacher.parameters())
        return metrics

    monkeypatch.setattr(opsd, "opsd_step", measuring_step)
    metrics = opsd.opsd_phase(policy, episodes, tk, cfg, seed=0)
    assert seen["growth"] > 3 * model_bytes  # teacher copy + AdamW's two moments + gradients
    assert metrics["opsd/kl_after"] < 0.8 * metrics["opsd/kl_before"]


def test_mismatched_references_come_from_other_questions():
    tk = tiny_tokenizer()
    episodes = []
    for q in range(3):
        episodes += [episode(tk, q, f"r{q} w1", 1.0), episode(tk, q, "w2 w3", 0.0), episode(tk, q, "w4", 0.0)]
    pairs, _ = mine_pairs(episodes, students="all")
    mismatched = opsd.mismatch_references(pairs)
    assert [p.student for p in mismatched] == [p.student for p in pairs]
    assert all(p.reference.group_id != p.student.group_id and p.reference.reward == 1.0 for p in mismatched)
    assert {p.reference.group_id for p in mismatched} == {0, 1, 2}
    assert opsd.mismatch_references([p for p in pairs if p.student.group_id == 0]) == []  # no other question


@pytest.mark.parametrize("lora_rank", [0, 1])
def test_under_bf16_autocast_each_opsd_step_sees_the_previous_ones(lora_rank):
    """train.py runs a whole OPSD phase inside one autocast region: the KL must fall there as in fp32 (autocast's
    weight cache once kept every step at the start point: kl_after == kl_before for LoRA)."""
    if lora_rank:
        pytest.importorskip("peft", reason="LoRA OPSD needs PEFT (requirements-lora.txt)")
    import parallel

    tk = tiny_tokenizer()
    episodes, cfg = lora_setting(tk, opsd_lora_rank=lora_rank)
    with parallel.autocast(True, "cpu"):
        metrics = opsd.opsd_phase(tiny_model(len(tk)), episodes, tk, cfg, seed=0)
    assert metrics["opsd/optimizer_steps"] == 9
    assert metrics["opsd/kl_after"] < 0.8 * metrics["opsd/kl_before"]
