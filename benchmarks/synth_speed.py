"""Speed of the synthetic chest X-ray generator (`cxr-embed synth`): render time and end-to-end time.

Renders ``--n`` images at ``--size`` in memory (ms per image, what the generator itself costs), then
writes ``--n`` images in the ChestX-ray14 layout to a temporary folder (ms per image including PNG
encoding, which dominates at 1024 px).

    python benchmarks/synth_speed.py --n 50 --size 1024
    python benchmarks/synth_speed.py --n 200 --size 256
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50, help="images to render and to write")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from cxr_embed.synth import generate, plan_cases, render_case

    cases = plan_cases(args.n, args.seed)
    render_case(cases[0], args.seed, args.size)  # warm the noise bank
    start = time.perf_counter()
    for case in cases:
        render_case(case, args.seed, args.size)
    render_ms = (time.perf_counter() - start) / args.n * 1000
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        generate(out, args.n, seed=args.seed, size=args.size)
        write_ms = (time.perf_counter() - start) / args.n * 1000
    print(
        f"size {args.size}px, n {args.n}: render {render_ms:.1f} ms/image, render+PNG write {write_ms:.1f} ms/image"
    )


if __name__ == "__main__":
    main()
