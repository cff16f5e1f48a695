"""PyTorch eager baseline of the authors' meta-gradient (needs ``pip install -e '.[torch]'``).

    python -m benchmarks.torch_baseline [--depth 18] [--image_size 96] [--batch 32] [--repeats 3]

The authors' algorithm, as their PyTorch code runs it: deep-copy the model, one plain SGD
step on T_i on the copy, G = grad of L(T_j) at the copy; for the exact meta-gradient, the
T_i forward/backward again on the original with ``create_graph=True`` and Eq. 5,
H G = grad < G, g(theta) >; meta-gradient G - eta H G. BatchNorm in training mode throughout.
Time per meta-gradient (median of ``--repeats`` after one warm-up), on the same shapes as
``benchmarks.meta_step --scope meta`` so the two can be compared in one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


def authors_meta_gradient(model, inner, outer, inner_lr: float, exact: bool):
    import torch
    import torch.nn.functional as F

    params = list(model.parameters())
    adapted = copy.deepcopy(model)
    inner_loss = F.cross_entropy(adapted(inner[0]), inner[1])
    inner_grads = torch.autograd.grad(inner_loss, list(adapted.parameters()))
    with torch.no_grad():
        for p, g in zip(adapted.parameters(), inner_grads):
            p.sub_(inner_lr * g)
    outer_loss = F.cross_entropy(adapted(outer[0]), outer[1])
    outer_grads = torch.autograd.grad(outer_loss, list(adapted.parameters()))
    if not exact:
        return outer_grads
    # Eq. 5: H G = d/dtheta < stop_grad(G), g(theta) >, with g recomputed with a graph.
    grads_with_graph = torch.autograd.grad(F.cross_entropy(model(inner[0]), inner[1]), params, create_graph=True)
    hessian_times_g = torch.autograd.grad(grads_with_graph, params, grad_outputs=outer_grads)
    return [g - inner_lr * hg for g, hg in zip(outer_grads, hessian_times_g)]


def time_authors_meta_gradient(depth: int, image_size: int, batch: int, repeats: int, device: str | None = None,
                                log=print) -> list[dict]:
    """Median seconds of the authors' first-order and exact meta-gradient (one warm-up call first)."""
    import torch

    from benchmarks.torch_reference import torch_resnet

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = torch_resnet(depth, 200).to(device).train()
    shape = (batch, 3, image_size, image_size)
    inner = (torch.randn(shape, device=device), torch.randint(0, 200, (batch,), device=device))
    outer = (torch.randn(shape, device=device), torch.randint(0, 200, (batch,), device=device))
    log(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads")
    rows = []
    for exact in (False, True):
        samples = []
        for repeat in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            authors_meta_gradient(model, inner, outer, 0.01, exact)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:  # the first call warms up
                samples.append(time.perf_counter() - start)
        row = dict(framework="torch", depth=depth, image_size=image_size, batch=batch,
                   method="exact" if exact else "first_order", seconds=statistics.median(samples))
        log(f"torch R-{depth} {image_size}px b{batch} {row['method']:<12} {1e3 * row['seconds']:9.1f} ms  "
            f"{batch * 2 / row['seconds']:8.1f} target images/s")
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    time_authors_meta_gradient(args.depth, args.image_size, args.batch, args.repeats, args.device,
                               log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
