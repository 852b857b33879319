"""What the built-in testbed's starting model leaves for GRPO and OPSD to do, and how robust its starting point is.

    python bench/testbed.py [--perturb 1e-6,1e-5] [--draws 5]

Loads (or builds, ~3 min) the default tiny model as `python train.py` does and prints: the greedy breakdown of the
start by question type (bench/ablation.final_breakdown); tiny.probe (two-hop success under sampling, redundant
searches, teacher vs student, near-ties); the exact match of sampled searching episodes with and without a
redundant search (does the reward alone already discourage them?); and the starting greedy exact match after
adding Gaussian noise of each --perturb std to every weight (--draws times each): builds on two machines differ
by float rounding (up to 7.8e-7 in the weights was seen), and a start decided by near-ties would move under it.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import ablation  # noqa: E402
import data  # noqa: E402
import rollout  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--perturb", default="1e-6,1e-5", help="comma-separated noise stds")
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    cfg = train.parse_config([])
    world = data.make_world(**train.world_args(cfg))
    model, tokenizer = tiny.load_tiny(world, recipe=tiny.TinyRecipe())
    retriever = train.make_retriever(cfg, world)

    start = ablation.final_breakdown(model, tokenizer, world, retriever, cfg)
    print("| start (greedy, test split) | value |\n|---|---|")
    for key, value in start.items():
        print(f"| {key} | {value:.3f} |")
    probe = tiny.probe(model, tokenizer, world, retriever, train.rollout_config(cfg, seed=1))
    print("\n| tiny.probe | value |\n|---|---|")
    for key, value in probe.items():
        print(f"| {key} | {value:.3f} |")

    # Does the reward see redundant searching? Exact match of sampled searching episodes, redundant or not.
    sampled = rollout.rollout(model, tokenizer, world.train[:200], retriever, train.rollout_config(cfg, seed=1))
    print("\n| sampled searching episodes (200 training questions x G) | redundant: n, EM | not redundant: n, EM |")
    print("|---|---|---|")
    for kind in ablation.TYPES:
        searched = [e for e in sampled if world.question_type(e.example) == kind and e.num_searches]
        cells = []
        for redundant in (True, False):
            rewards = [e.reward for e in searched if tiny.is_redundant(e, world) == redundant]
            cells.append(f"{len(rewards)}, {sum(rewards) / max(len(rewards), 1):.3f}")
        print(f"| {kind} | {cells[0]} | {cells[1]} |")

    base = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    greedy = train.rollout_config(cfg, seed=0, greedy=True)
    print("\n| noise std | starting EM of each draw |\n|---|---|")
    for std in (float(s) for s in args.perturb.split(",")):
        ems = []
        for _ in range(args.draws):
            with torch.no_grad():
                for name, p in model.state_dict().items():
                    p.copy_(base[name] + std * torch.randn(p.shape, generator=generator))
            episodes = rollout.rollout(model, tokenizer, world.test[:cfg.eval_limit], retriever, greedy)
            ems.append(sum(e.reward for e in episodes) / len(episodes))
        print(f"| {std:g} | {', '.join(f'{em:.3f}' for em in ems)} |")


if __name__ == "__main__":
    main()
