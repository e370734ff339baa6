#!/usr/bin/env python3
"""Writes the generated multiple-choice task files shipped in data/tasks/ (see data/tasks/README.md).

Deterministic: a fixed 64-bit LCG (Knuth's MMIX constants), not Python's `random`, so every Python 3
version writes the same bytes. Usage: python3 scripts/make_tasks.py [out_dir]  (default data/tasks).
The format is the one `rwkvx eval tasks` reads (docs/eval.md): {"context", "choices", "label"}; the
continuation of each choice is " " + choice (the default delimiter).
"""
import json
import os
import sys


class Lcg:
    def __init__(self, seed):
        self.s = seed & 0xFFFFFFFFFFFFFFFF

    def next(self):
        self.s = (self.s * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        return self.s >> 33

    def below(self, n):
        return self.next() % n

    def shuffle(self, xs):
        for i in range(len(xs) - 1, 0, -1):
            j = self.below(i + 1)
            xs[i], xs[j] = xs[j], xs[i]


def example(rng, context, answer, distractors):
    choices = [answer] + distractors
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(answer)}


def arithmetic(rng, n):
    out = []
    while len(out) < n:
        a, b = 10 + rng.below(90), 10 + rng.below(90)
        op = rng.below(2)
        ans = a + b if op == 0 else a - b
        cands = {ans + d for d in (1, -1, 10, -10, 2, 11)} - {ans}
        wrong = sorted(cands)
        rng.shuffle(wrong)
        word = "plus" if op == 0 else "minus"
        out.append(example(rng, f"Question: What is {a} {word} {b}?\nAnswer:", str(ans), [str(w) for w in wrong[:3]]))
    return out


def ordering(rng, n):
    out = []
    while len(out) < n:
        nums = set()
        while len(nums) < 4:
            nums.add(1 + rng.below(99))
        nums = list(nums)
        rng.shuffle(nums)
        largest = rng.below(2) == 0
        ans = max(nums) if largest else min(nums)
        listed = ", ".join(str(x) for x in nums)
        q = f"Question: Which number is the {'largest' if largest else 'smallest'} of {listed}?\nAnswer:"
        out.append(example(rng, q, str(ans), [str(x) for x in nums if x != ans]))
    return out


WORDS = ("apple river stone cloud tiger paper green silver window garden bread candle forest mirror "
         "orange rabbit summer winter yellow castle pencil bottle shadow valley").split()


def copying(rng, n):
    out = []
    while len(out) < n:
        k = 3 + rng.below(3)
        ws = []
        while len(ws) < k:
            w = WORDS[rng.below(len(WORDS))]
            if w not in ws:
                ws.append(w)
        ans = " ".join(ws)
        wrong = set()
        while len(wrong) < 3:
            p = list(ws)
            rng.shuffle(p)
            if p != ws:
                wrong.add(" ".join(p))
        q = f"Repeat the words exactly.\nWords: {ans}\nRepeat:"
        out.append(example(rng, q, ans, sorted(wrong)))
    return out


SEQUENCES = [
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "January February March April May June July August September October November December".split(),
    "one two three four five six seven eight nine ten eleven twelve".split(),
    "first second third fourth fifth sixth seventh eighth ninth tenth".split(),
    list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
]


def sequences(rng, n):
    out = []
    while len(out) < n:
        seq = SEQUENCES[rng.below(len(SEQUENCES))]
        start = rng.below(len(seq) - 4)
        shown = seq[start:start + 3]
        ans = seq[start + 3]
        others = [w for w in seq if w != ans and w not in shown]
        rng.shuffle(others)
        q = f"Continue the sequence: {', '.join(shown)},"
        out.append(example(rng, q, ans, others[:3]))
    return out


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "data", "tasks")
    os.makedirs(out_dir, exist_ok=True)
    for name, fn, seed in (("arithmetic", arithmetic, 1), ("ordering", ordering, 2), ("copy", copying, 3),
                           ("sequences", sequences, 4)):
        rows = fn(Lcg(seed), 100)
        with open(os.path.join(out_dir, name + ".jsonl"), "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
