"""Multi-turn search rollouts. (skeleton: being filled in, see issue 3)"""
from __future__ import annotations

from dataclasses import dataclass, field

from data import Example

# Search-R1's instruction (DESIGN.md, compatibility facts), verbatim.
INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you "
    "get new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n"
)


@dataclass
class RolloutConfig:
    num_generations: int = 5  # G: samples per question
    max_turns: int = 4  # searches allowed; then one last turn in which only an answer counts
    max_new_tokens: int = 500  # per turn
    max_obs_tokens: int = 500  # retrieved text is cut to this many tokens
    max_context_tokens: int = 4096  # prompt + response; longer episodes end with is_truncated
    topk: int = 3  # passages per search
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False  # evaluation decodes greedily
    seed: int = 0


@dataclass
class Episode:
    example: Example
    group_id: int  # unique per example within a rollout batch
    prompt_ids: list[int]
    response_ids: list[int]  # sampled ids exactly as sampled, plus injected observation ids
    loss_mask: list[int]  # 1 on sampled tokens, 0 on injected ones; same length as response_ids
    text: str = ""  # decode(response_ids)
    answer: str | None = None
    reward: float = 0.0
    num_searches: int = 0
    queries: list[str] = field(default_factory=list)
    num_invalid: int = 0
    is_truncated: bool = False
    finish_reason: str = ""  # "answer" | "eos" | "max_turns" | "length" | "context"


def build_prompt(tokenizer, question: str, privileged: str = "") -> str:
    """The Search-R1 user turn in the tokenizer's chat template, with the generation prompt.

    `privileged` is appended to the user turn (OPSD's teacher context); empty for the policy.
    """
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    content = INSTRUCTION.format(question=question) + privileged
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    return content
