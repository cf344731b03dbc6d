"""Selective-scan benchmark: ``lessons.ssm`` against the pure-PyTorch peer ``mambapy``.

    python -m reprod.course.bench_scan                  # 2 threads, float32, the shapes below
    python -m reprod.course.bench_scan --shapes issue --repeats 7 --json out.json
    python -m reprod.course.bench_scan --chunk-sizes 8 16 32 64   # the fast scan's chunk

Both sides compute the same thing end to end from the same inputs: discretisation
(exp(ΔA), ΔBu), the scan, the C contraction and the D skip; each gets its own layout prepared
outside the timed region (ours (batch, D, L), mambapy's (batch, L, D)). The peer is mambapy's
``MambaBlock.selective_scan`` (its Blelloch ``pscan`` fed the discretised inputs it needs).
Forward runs under ``torch.no_grad``; forward+backward back-propagates a fixed random cotangent
into u, Δ, A, B, C and D. Timings are medians over ``--repeats`` runs after a warm-up, ours and
the peer alternating, and every ratio is peer / ours from the same run. Accuracy is the max
absolute error of the forward output against the float64 reference (``impl="ref"``) and the
max error of the input gradients relative to their largest magnitude.

Shapes (batch, D, L, N): ``issue`` (2, 512, 2048, 16), the issue's target; ``mvfuser_toy``
(16, 96, 262, 16), one MVFuser over the toy VFM + toy VLM tokens (133 + 129) at batch 16;
``mvfuser_full`` (2, 512, 2050, 16), one MVFuser at MFuser's scale (CLIP-L at 512², 1025 + 1025
tokens, d_model 1024 → scan width 512, 2 images per GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lessons.ssm import SCAN_SHAPES, default_chunk_size, scan_inputs, selective_scan
from lessons.utils import hardware, set_threads

__all__ = [
    "TARGETS",
    "accuracy",
    "bench_shape",
    "forward_backward",
    "main",
    "mambapy_scan",
    "median_ms",
    "ours",
    "print_row",
    "to_mambapy_layout",
]

TARGETS = {"forward": 4.0, "forward+backward": 3.0}   # the minimum speed-ups over mambapy


def ours(x: dict, impl: str = "fast", chunk_size: int | None = None) -> torch.Tensor:
    return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], impl=impl,
                          chunk_size=chunk_size)


def to_mambapy_layout(x: dict) -> dict:
    """mambapy's layout: (batch, L, D) and (batch, L, N)."""
    out = {k: v.transpose(1, 2).contiguous() for k, v in x.items() if k in ("u", "delta", "B", "C")}
    out.update(A=x["A"], D=x["D"], grad=x["grad"].transpose(1, 2).contiguous())
    return out


def mambapy_scan(x: dict) -> torch.Tensor:
    """mambapy 1.2.0's selective scan (pscan path); it uses nothing of its block but the inputs."""
    from mambapy.mamba import MambaBlock

    return MambaBlock.selective_scan(None, x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"])


def forward_backward(fn: Callable[[dict], torch.Tensor], x: dict) -> dict[str, torch.Tensor]:
    leaves = {k: v.detach().requires_grad_() for k, v in x.items() if k != "grad"}
    y = fn({**leaves, "grad": x["grad"]})
    y.backward(x["grad"])
    return {k: v.grad for k, v in leaves.items()}


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function in ms; one warm-up each, then alternating runs."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def accuracy(x: dict, chunk_size: int | None) -> dict[str, float]:
    """Forward max abs error and gradient max relative error of the fast scan vs float64 ref."""
    x64 = {k: v.double() for k, v in x.items()}
    with torch.no_grad():
        err = (ours(x, "fast", chunk_size).double() - ours(x64, "ref")).abs().max().item()
    g32 = forward_backward(lambda a: ours(a, "fast", chunk_size), x)
    g64 = forward_backward(lambda a: ours(a, "ref"), x64)
    rel = max(((g32[k].double() - g64[k]).abs().max() / g64[k].abs().max()).item() for k in g64)
    return {"forward_max_abs_err": err, "grad_max_rel_err": rel}


def bench_shape(name: str, repeats: int, chunk_size: int | None, check: bool) -> dict:
    batch, dim, length, n = SCAN_SHAPES[name]
    x = scan_inputs(batch, dim, length, n)
    xp = to_mambapy_layout(x)
    row = {"shape": name, "batch": batch, "D": dim, "L": length, "N": n,
           "chunk": chunk_size or default_chunk_size(batch, dim, n)}
    with torch.no_grad():
        fwd = median_ms({"ours": lambda: ours(x, "fast", chunk_size),
                         "mambapy": lambda: mambapy_scan(xp)}, repeats)
    both = median_ms({"ours": lambda: forward_backward(lambda a: ours(a, "fast", chunk_size), x),
                      "mambapy": lambda: forward_backward(mambapy_scan, xp)}, repeats)
    for mode, t in (("forward", fwd), ("forward+backward", both)):
        row[mode] = {"ours_ms": t["ours"], "mambapy_ms": t["mambapy"],
                     "speedup": t["mambapy"] / t["ours"]}
    if check:
        row.update(accuracy(x, chunk_size))
    return row


def print_row(r: dict) -> None:
    shape = f"{r['shape']} (batch {r['batch']}, D {r['D']}, L {r['L']}, N {r['N']}, T {r['chunk']})"
    print(shape)
    for mode in ("forward", "forward+backward"):
        m = r[mode]
        verdict = "ok" if m["speedup"] >= TARGETS[mode] else f"BELOW the {TARGETS[mode]}x target"
        print(f"  {mode:17s} ours {m['ours_ms']:8.1f} ms   mambapy {m['mambapy_ms']:8.1f} ms   "
              f"speed-up {m['speedup']:5.2f}x  ({verdict})")
    if "forward_max_abs_err" in r:
        print(f"  vs float64 reference: forward max abs err {r['forward_max_abs_err']:.1e}, "
              f"gradients max rel err {r['grad_max_rel_err']:.1e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", choices=sorted(SCAN_SHAPES),
                    default=list(SCAN_SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[None],
                    help="fast-scan chunk lengths to try (default: its own choice)")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 accuracy check")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        import mambapy  # noqa: F401
    except ImportError:
        ap.error("the peer mambapy is not installed: pip install 'mambapy==1.2.0' "
                 "(part of the dev extra)")
    threads = set_threads(args.threads)
    print(f"selective scan, float32, {threads} threads, torch {torch.__version__}, "
          f"{hardware('cpu')}; medians of {args.repeats} runs")
    rows = []
    for name in args.shapes:
        for chunk in args.chunk_sizes:
            rows.append(bench_shape(name, args.repeats, chunk, check=not args.no_check))
            print_row(rows[-1])
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "torch": torch.__version__,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
