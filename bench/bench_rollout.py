"""Rollout throughput: our multi-turn loop vs one plain `model.generate` vs a loop that re-tokenises every turn.

    python bench/bench_rollout.py [--batch 8] [--free 96] [--hidden 512] [--layers 8] [--threads 1] [--repeats 2]

A random Qwen2 (hidden 512, 8 layers: ~25M parameters, so the model and not Python dominates on a CPU) with a
byte-level BPE tokenizer trained here on the synthetic world, BM25 over the world's corpus. A random model never
writes tags, so every turn is made the same way in all three: `free` sampled tokens, then a forced
`<search> NAME </search>` (the logits of those steps put all mass on the next tag token), EOS never sampled. Each
sequence thus gets exactly (max_turns + 1) * turn_tokens new tokens in all three:
  rollout   rollout.rollout: max_turns searches (batched BM25, observations appended as ids), then the final turn;
            a second line with empty search results (`<information></information>`) separates the cost of the
            loop from the cost of reading the retrieved text, which plain generate never reads
  generate  one model.generate call, max_new_tokens = the same total, no searches (the ceiling for one batch)
  naive     per turn: decode, concatenate text and observation, re-encode the whole text, model.generate the turn
            (Search-R1's way, without its vLLM); same turns, same searches
tokens/s counts sampled tokens only. All methods sample (temperature 1). Best of `repeats` runs, one process,
one thread by default: the cores here are shared, and a multi-threaded CPU forward stalls when another process
takes a core, which would time the neighbours rather than the methods.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import rollout  # noqa: E402
from search import BM25Retriever, parse_corpus_row  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(world, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [r["contents"] for r in world.corpus] + [e.question for e in world.train]
    texts += [rollout.INSTRUCTION, rollout.INVALID_ACTION_NOTE, "<search> </search> <information> </information>"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def forced_model_class():
    from transformers import Qwen2ForCausalLM

    class ForcedTurns(Qwen2ForCausalLM):
        """Each generation call (a prefill, then one token per step) samples `free` tokens, then is forced through
        `forced` (when set); EOS is never sampled. The forcing costs one masked write of the last logits."""

        free, forced, eos = 0, [], None

        def forward(self, input_ids=None, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            self.step = 0 if input_ids.shape[1] > 1 else self.step + 1
            logits = out.logits[:, -1]  # (B, V)
            logits[:, self.eos] = float("-inf")
            if self.forced and self.step >= self.free:
                logits.fill_(float("-inf"))
                logits[:, self.forced[min(self.step - self.free, len(self.forced) - 1)]] = 0.0
            return out

    return ForcedTurns


def naive_rollout(model, tokenizer, prompts: list[str], retriever, cfg, turn_tokens: int) -> int:
    """Search-R1's pattern: text state, re-encoded in full before every turn's `generate`. Returns tokens sampled."""
    texts, sampled = list(prompts), 0
    tokenizer.padding_side = "left"
    for turn in range(cfg.max_turns + 1):
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=turn_tokens, do_sample=True, temperature=cfg.temperature,
                             top_p=cfg.top_p, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch.input_ids.shape[1]:]
        sampled += new.numel()
        turn_texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        texts = [t + s for t, s in zip(texts, turn_texts)]
        if turn < cfg.max_turns:
            queries = [rollout.parse_search(s) for s in turn_texts]
            results = retriever.search(queries, cfg.topk)
            texts = [t + rollout.format_observation(p) for t, p in zip(texts, results)]
    return sampled


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences (questions x generations)")
    parser.add_argument("--free", type=int, default=96, help="sampled tokens per turn before the forced search")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Qwen2Config

    world = data.make_world(seed=0)
    tokenizer = build_tokenizer(world, args.vocab)
    retriever = BM25Retriever(passages=[parse_corpus_row(r) for r in world.corpus])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = forced_model_class()(config).eval()
    name = world.corpus[0]["contents"].split("\n")[0].strip('"')
    forced = tokenizer(f" <search> {name} </search>", add_special_tokens=False).input_ids
    model.eos = tokenizer.eos_token_id
    examples = world.test[:args.batch // 2]
    prompts = [rollout.build_prompt(tokenizer, e.question) for e in examples for _ in range(2)]

    def setup(free: int):
        """Turns of `free` sampled tokens + the forced search: the config and new tokens per sequence."""
        model.free = free
        cfg = rollout.RolloutConfig(num_generations=2, max_turns=4, max_new_tokens=free + len(forced),
                                    max_obs_tokens=500, max_context_tokens=4096, topk=3, temperature=1.0, top_p=1.0)
        return cfg, (cfg.max_turns + 1) * cfg.max_new_tokens

    obs_tokens = {}

    def run_rollout(free: int, retriever=retriever) -> int:
        cfg, total = setup(free)
        model.forced = forced
        episodes = rollout.rollout(model, tokenizer, examples, retriever, cfg)
        assert all(e.num_searches == cfg.max_turns and sum(e.loss_mask) == total for e in episodes)
        obs_tokens[retriever] = sum(len(e.loss_mask) - sum(e.loss_mask) for e in episodes) / len(episodes)
        return sum(sum(e.loss_mask) for e in episodes)

    class NoResults:
        def search(self, queries, topk):
            return [[] for _ in queries]

    def run_rollout_empty(free: int) -> int:
        return run_rollout(free, NoResults())

    def run_generate(free: int) -> int:
        cfg, total = setup(free)
        model.forced = []
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=total, do_sample=True, temperature=1.0, top_p=1.0,
                             pad_token_id=tokenizer.pad_token_id)
        return out[:, batch.input_ids.shape[1]:].numel()

    def run_naive(free: int) -> int:
        cfg, _ = setup(free)
        model.forced = forced
        return naive_rollout(model, tokenizer, prompts, retriever, cfg, cfg.max_new_tokens)

    methods = {"rollout (ours)": run_rollout, "  empty observations": run_rollout_empty,
               "model.generate": run_generate, "naive re-tokenising": run_naive}
    n_params = sum(p.numel() for p in model.parameters())
    prompt_len = sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts) / len(prompts)
    cfg, total = setup(args.free)
    print(f"Qwen2 {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, vocab {len(tokenizer)}), "
          f"torch threads {torch.get_num_threads()}, {len(prompts)} sequences, prompt {prompt_len:.0f} tokens, "
          f"{cfg.max_turns + 1} turns x {cfg.max_new_tokens} tokens = {total} new tokens per sequence, "
          f"{cfg.max_turns} BM25 searches (top-{cfg.topk})")
    with torch.inference_mode():
        for fn in methods.values():  # warm-up, so that first-call costs stay out of the timings
            fn(2)
        best, tokens = {k: float("inf") for k in methods}, {}
        for _ in range(args.repeats):
            for key, fn in methods.items():
                start = time.perf_counter()
                tokens[key] = fn(args.free)
                best[key] = min(best[key], time.perf_counter() - start)
    assert len(set(tokens.values())) == 1, tokens  # the same sampled tokens in all
    print(f"rollout: {obs_tokens[retriever]:.0f} observation tokens per sequence read besides the sampled ones")
    base = tokens["model.generate"] / best["model.generate"]
    print(f"{'method':<22}{'seconds':>9}{'tokens':>8}{'tokens/s':>10}{'vs generate':>13}")
    for key in methods:
        rate = tokens[key] / best[key]
        print(f"{key:<22}{best[key]:>9.2f}{tokens[key]:>8}{rate:>10.1f}{rate / base:>12.2f}x")


if __name__ == "__main__":
    main()
