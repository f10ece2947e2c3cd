"""A long prompt beside an answer being generated, in one batcher: how long the answer stalls, by step budget.

    python examples/long_prompt.py [--model DIR] [--prompt-tokens 1024] [--prompts 1] [--budgets 4096,256] [--new-tokens 48] [--rounds 3]

Two sessions share a `Batcher` (as two server requests do, `streamvlm serve --max-step-tokens`). A has two
frames and generates --new-tokens tokens; once it has its fourth, B asks a text question of about
--prompt-tokens tokens. With a budget at least the prompt's length, B's prefill is one step, and A's next token
waits for all of it; with a smaller budget the prefill runs in pieces of at most that many tokens, a step
each, and A's tokens go on beside them. With --prompts N, N sessions each ask such a question at that moment.
Reported per budget (medians over rounds, budgets alternated within a round): A's longest gap between two
tokens, A's median gap, and the time to the first token of the last long prompt to get one (what the pieces
cost the long prompts). Without --model it uses the real-small-shaped random checkpoint of `streamvlm
bench` (made on first use), where a prefill of 1024 tokens takes about a second on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from streamvlm import StreamVLM
from streamvlm.batching import Batcher


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the real-small-shaped bench checkpoint)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="about how long B's question is, in "
                        "tokens (default 1024)")
    parser.add_argument("--prompts", type=int, default=1, help="long prompts asked at once (default 1)")
    parser.add_argument("--budgets", default="4096,256", help="step budgets (--max-step-tokens) compared, "
                        "comma-separated (default 4096,256)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens A generates (default 48; at least 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every budget once (default 3)")
    args = parser.parse_args(argv)
    try:
        budgets = _budgets(args.budgets)
    except ValueError:
        parser.error(f"--budgets must be whole numbers separated by commas, got {args.budgets!r}")
    if min(budgets) < 1 or args.prompt_tokens < 1 or args.rounds < 1 or args.prompts < 1:
        parser.error("--budgets, --prompt-tokens, --prompts and --rounds must be at least 1")
    if args.new_tokens < 8:
        parser.error("--new-tokens must be at least 8 (B starts after A's fourth token)")
    return args


def _budgets(text: str) -> list[int]:
    return [int(b) for b in text.split(",")]


def _prompt(vlm: StreamVLM, tokens: int) -> str:
    """A question of about `tokens` tokens."""
    words = "what does the camera show on the left side and what moves next to it".split()
    text = ""
    i = 0
    while len(vlm.tokenizer(text)["input_ids"]) < tokens:
        text += " ".join(words[(i + j) % len(words)] for j in range(32)) + " "
        i += 7
    return text.strip() + "?"


def _run(vlm: StreamVLM, budget: int, prompt: str, new_tokens: int, prompts: int = 1) -> dict:
    """One race of A's answer against `prompts` long prompts under `budget`: A's gaps and the last long prompt's
    time to its first token."""
    batcher = Batcher(max_batch=max(4, prompts + 1), max_step_tokens=budget)
    batched = vlm.batched(batcher)
    size = vlm.adapter.preprocess_config
    frames = torch.randint(0, 256, (2, size.height, size.width, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    a, bs = batched.session(), [batched.session() for _ in range(prompts)]
    a.append_frames(frames, [0.0, 0.5])
    fourth = threading.Event()
    times: list[float] = []
    first_b: list[float] = []

    def answer_a():
        for i, _ in enumerate(a.ask_stream("Describe the video.", max_new_tokens=new_tokens, ignore_stop=True)):
            times.append(time.perf_counter())
            if i == 3:
                fourth.set()

    def ask_b(b):
        fourth.wait(600)
        start = time.perf_counter()
        for _ in b.ask_stream(prompt, max_new_tokens=1, ignore_stop=True, last=True):
            first_b.append(time.perf_counter() - start)

    threads = [threading.Thread(target=answer_a), *(threading.Thread(target=ask_b, args=(b,)) for b in bs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.close()
    gaps = [t1 - t0 for t0, t1 in zip(times, times[1:])]
    return {"longest_gap": max(gaps), "median_gap": statistics.median(gaps), "first_token_b": max(first_b),
            "prompt_tokens": bs[0].stats()["tokens"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    budgets = _budgets(args.budgets)
    if args.model:
        model = args.model
    else:
        from streamvlm.bench.common import bench_model_dir

        model = bench_model_dir()
    vlm = StreamVLM.from_pretrained(model)
    prompt = _prompt(vlm, args.prompt_tokens)
    _run(vlm, max(budgets), prompt, 8)  # warm-up: first-call paths
    rows: dict[int, list[dict]] = {budget: [] for budget in budgets}
    for _ in range(args.rounds):
        for budget in budgets:
            rows[budget].append(_run(vlm, budget, prompt, args.new_tokens, args.prompts))
    print(f"model {model}; {args.prompts} long prompt(s) of {rows[budgets[0]][0]['prompt_tokens']} tokens; A "
          f"generates {args.new_tokens}; medians of {args.rounds} round(s)")
    print(f"{'budget':>8} {'A longest gap ms':>17} {'A median gap ms':>16} {'B first token ms':>17}")
    medians = {}
    for budget in budgets:
        medians[budget] = {k: statistics.median(r[k] for r in rows[budget])
                           for k in ("longest_gap", "median_gap", "first_token_b")}
        m = medians[budget]
        print(f"{budget:>8} {m['longest_gap'] * 1e3:>17.1f} {m['median_gap'] * 1e3:>16.1f} "
              f"{m['first_token_b'] * 1e3:>17.1f}")
    base = medians[budgets[0]]
    for budget in budgets[1:]:
        m = medians[budget]
        print(f"budget {budget} against {budgets[0]}: A's longest gap {m['longest_gap'] / base['longest_gap']:.2f}x, "
              f"B's first token {m['first_token_b'] / base['first_token_b']:.2f}x")


if __name__ == "__main__":
    main()
