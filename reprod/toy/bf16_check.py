"""Check: does a training step under bfloat16 autocast compute the gradients float32 does?

    python -m reprod.toy.bf16_check                         # one method per kind of model
    python -m reprod.toy.bf16_check --methods querydiff tqdm --json runs/bf16.json
    python -m reprod.toy.bf16_check --device cuda           # before a GPU sweep in bf16

A kernel that is wrong in bf16 makes no error: a run just learns less, or diverges later
(PyTorch 2.14's CPU dilated depthwise convolution of a channels-last map did this to QueryDiff's
refinement). World 2's sweep trains in bf16 on a CUDA GPU only, so that is where this must pass
before a sweep (``reprod.gpu_check`` runs it first; exit status 1 when a layer is off), and on a
CPU it says why the sweep does not use bf16 there. This takes one source batch of world
2 (augmented as the sweep augments it), runs the step's forward and backward once in float32 and
once under bf16 autocast from the same weights, and prints per method:

- ``loss``: the float32 and bf16 summed losses;
- ``cosine``: the cosine of the two whole gradients (every trainable parameter, flattened);
- ``worst``: the parameter whose bf16 gradient is furthest from float32's, as the norm of the
  difference over the norm of float32's gradient;
- ``layers off``: every convolution (1-d, 2-d, transposed) checked on its own, on the input it
  got in the step: its output, input gradient and weight gradient under bf16 against float32.
  One bf16 layer is off by about 0.3% of the norm; a layer off by more than ``LAYER_TOLERANCE``
  has a wrong kernel, whatever the whole model's numbers say.

A Mask2Former-style criterion's Hungarian matching may pick different pairs in bf16 than in
float32 on a borderline cost, which moves the gradients of the matched heads without any kernel
being wrong: the per-layer check is free of that. Nothing here changes a run. (What it found on
PyTorch 2.14's CPU kernels: a convolution with kernel = stride >= 4 and fewer than 32 input
channels, which is the input gradient of CAT-Seg's 4x transposed convolution, and QueryDiff's
dilated depthwise convolutions of a channels-last map; world 2 trains in float32 on a CPU.)
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from lessons import toyworld as tw
from lessons.augment import augment_batch
from lessons.benchmark import METHODS, seeds_of
from lessons.checkpoints import build_model
from lessons.train import CPU_BF16_ATTENTION, compute_losses
from lessons.utils import hardware, seed_everything

__all__ = ["DEFAULT_METHODS", "LAYER_TOLERANCE", "gradient_agreement", "layer_agreement", "main"]

BATCH = 16
# every kind of model world 2's sweep trains (full fine-tuning: every encoder weight has a gradient)
DEFAULT_METHODS = ("scratch", "full", "rein", "rein_m2f", "tqdm", "catseg", "querydiff", "mfuser")
LAYER_TOLERANCE = 0.05              # relative error of one layer's bf16 output or gradients
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose2d)


def _gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               bf16: bool, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The summed loss and every trainable parameter's gradient (float32) of one step."""
    from torch.nn.attention import sdpa_kernel

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)                                 # the same noise draws in both passes
    attention = sdpa_kernel(CPU_BF16_ATTENTION) if images.device.type == "cpu" else nullcontext()
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16), attention:
        loss = sum(compute_losses(model, images, labels).values())
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return float(loss.detach()), grads


def gradient_agreement(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       seed: int = 0) -> dict:
    """One step's float32 and bf16-autocast gradients from the same weights, compared:
    ``loss_fp32``, ``loss_bf16``, ``cosine`` (whole gradient), ``worst`` (parameter name) and
    ``worst_error`` (|g_bf16 - g_fp32| / |g_fp32| of that parameter), ``non_finite`` (names of
    parameters whose bf16 gradient holds NaN or inf)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss32, g32 = _gradients(model, images, labels, bf16=False, seed=seed)
    model.load_state_dict(state)
    loss16, g16 = _gradients(model, images, labels, bf16=True, seed=seed)
    if set(g32) != set(g16):
        raise RuntimeError(f"the two passes reached different parameters: "
                           f"{sorted(set(g32) ^ set(g16))}")
    non_finite = [n for n, g in g16.items() if not torch.isfinite(g).all()]
    errors = {n: float((g16[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in g32.items()
              if n not in non_finite}
    flat32 = torch.cat([g32[n].flatten() for n in errors])
    flat16 = torch.cat([g16[n].flatten() for n in errors])
    worst = max(errors, key=errors.get) if errors else None
    return {"loss_fp32": loss32, "loss_bf16": loss16,
            "cosine": float(torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)),
            "worst": worst, "worst_error": errors.get(worst), "non_finite": non_finite}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in float32 (inf where ``a`` holds NaN or inf)."""
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _layer_inputs(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """The input each convolution gets in one float32 training forward (its first call),
    detached, in the memory format it came in."""
    inputs, handles = {}, []

    def keep(name: str, x: torch.Tensor) -> None:          # a hook returning None keeps the output
        if name not in inputs:
            inputs[name] = x.detach().clone(memory_format=torch.preserve_format)

    for name, module in model.named_modules():
        if isinstance(module, CONVOLUTIONS):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: keep(name, args[0])))
    try:
        with torch.no_grad():
            compute_losses(model, images, labels)
    finally:
        for h in handles:
            h.remove()
    return inputs


def layer_agreement(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Each convolution of ``model`` on the input it gets in a training step, alone: the
    relative error of its bf16-autocast ``output``, ``input_grad`` and ``weight_grad`` against
    float32's, for the same output gradient (drawn from ``seed``)."""
    modules = dict(model.named_modules())
    out = {}
    for name, x0 in _layer_inputs(model, images, labels).items():
        layer, runs = modules[name], []
        trainable = layer.weight.requires_grad            # frozen layers are checked too
        layer.weight.requires_grad_(True)
        for bf16 in (False, True):
            x = x0.float().clone(memory_format=torch.preserve_format).requires_grad_()
            layer.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                y = layer(x)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
            (y.float() * g).sum().backward()
            runs.append((y.detach(), x.grad, layer.weight.grad))
        layer.weight.requires_grad_(trainable)
        layer.zero_grad(set_to_none=True)
        (y32, gx32, gw32), (y16, gx16, gw16) = runs
        out[name] = {"output": _relative(y16, y32), "input_grad": _relative(gx16, gx32),
                     "weight_grad": _relative(gw16, gw32), "shape": list(x0.shape),
                     "channels_last": x0.dim() == 4 and x0.is_contiguous(
                         memory_format=torch.channels_last) and not x0.is_contiguous()}
    return out


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """World 2's first 16 source scenes at ``seed``, augmented as the sweep augments them."""
    train = tw.benchmark_datasets(seed)["train"]
    images, labels = zip(*(train[i] for i in range(BATCH)), strict=True)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    return augment_batch(torch.stack(images), torch.stack(labels), g)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    world2 = [m for m in METHODS if seeds_of(m, tw.TOYWORLD_VERSION)]
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=world2,
                    metavar="METHOD", help=f"default: {' '.join(DEFAULT_METHODS)}")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here")
    rows, any_off = {}, False
    with tw.in_world(tw.TOYWORLD_VERSION):
        images, labels = (t.to(device) for t in _batch())
        for m in args.methods:
            seed_everything(0)
            spec = METHODS[m]
            model = build_model(spec.builder, spec.builder_kwargs).to(device)
            r = rows[m] = gradient_agreement(model, images, labels)
            layers = r["layers"] = layer_agreement(model, images, labels)
            off = {n: v for n, v in layers.items()
                   if max(v["output"], v["input_grad"], v["weight_grad"]) > LAYER_TOLERANCE}
            print(f"{m:24s} loss {r['loss_fp32']:.4f} / {r['loss_bf16']:.4f}  cosine "
                  f"{r['cosine']:.4f}  worst {r['worst']} ({r['worst_error']:.3f})  layers off "
                  f"{len(off)} of {len(layers)}"
                  + (f"  NON-FINITE {r['non_finite']}" if r["non_finite"] else ""), flush=True)
            any_off = any_off or bool(off) or bool(r["non_finite"])
            for n, v in off.items():
                print(f"    {n} {tuple(v['shape'])}{' channels-last' if v['channels_last'] else ''}"
                      f": output {v['output']:.3f}, input grad {v['input_grad']:.3f}, weight "
                      f"grad {v['weight_grad']:.3f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"hardware": hardware(device), "torch": torch.__version__,
                                         "rows": rows}, indent=1) + "\n")
    return 1 if any_off else 0


if __name__ == "__main__":
    raise SystemExit(main())
