"""PII scrubbing cost on adversarial text, as a ratio against ordinary prose of the same length.

Linear patterns keep every ratio small (single digits) and flat as the length grows; a quadratic pattern's ratio
grows with the length (the former e-mail pattern: 100-1500x at 20k characters).

    .venv/bin/python benchmarks/data/bench_pii.py --chars 20000 200000
"""

from __future__ import annotations

import argparse
import time

from rayloop.data.pii import scrub


def cases(n: int) -> dict[str, str]:
    return {
        "local part without @": "a." * (n // 2),
        "local-part characters": "a-%+_" * (n // 5),
        "domain after @": "x@" + "a." * (n // 2),
        "many @": "a.@" * (n // 3),
        "key and white space": "token" + " " * n,
        "key, white space and =": "password" + " \t" * (n // 4) + "=" + "\n" * (n // 2),
        "digit groups": "1 " * (n // 2),
        "digits and dots": "1." * (n // 2),
        "key prefixes": "sk-AIza-xoxa-" * (n // 13),
    }


def seconds(text: str) -> float:
    t0 = time.perf_counter()
    scrub(text)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    for n in args.chars:
        prose_text = ("The capital of Kelsa is Drouth, founded 1999. Rivers run north; " * (n // 60 + 1))[:n]
        print(f"{n} characters")
        for name, text in cases(n).items():
            prose = adversarial = float("inf")
            for _ in range(args.rounds):  # interleaved: a busy moment slows both sides
                prose = min(prose, seconds(prose_text))
                adversarial = min(adversarial, seconds(text))
            print(
                f"  {name:24s} {adversarial * 1000:9.2f} ms  prose {prose * 1000:7.2f} ms  {adversarial / prose:6.1f}x"
            )


if __name__ == "__main__":
    main()
