"""The one local-training loop: the update a client sends, and the diagnostics of the sigma_g^2 probe.

Update semantics (design.md section 2): after H local SGD steps with rate lr from theta_t,
``u = (theta_t - theta_H) / (lr * H)``, the average local gradient. With H = 1 the loop returns the minibatch
gradient itself (no round trip through the weights), so COMP-AMS's Algorithm 2 is reproduced exactly and the
server learning rate keeps one meaning for every H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fl_compams.flat import ParamSpec

__all__ = ["evaluate", "full_gradient", "local_update"]


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def _minibatch_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def local_update(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """Run H = ``steps`` SGD steps on minibatches drawn with ``generator``; return (update u, mean loss).

    ``model`` holds theta_t on entry (on x's device) and theta_H on exit. The flat update follows the order of
    ``ParamSpec.from_module(model)`` (trainable tensors in state-dict order).
    """
    spec = ParamSpec.from_module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if [tuple(p.shape) for p in params] != [s for s, t in zip(spec.shapes, spec.trainable, strict=True) if t]:
        raise ValueError("model parameters must be in state-dict order for flattening")
    model.train()
    n = x.shape[0]
    theta0 = torch.cat([p.detach().reshape(-1) for p in params]) if steps > 1 else None
    losses = []
    for _ in range(steps):
        idx = torch.randperm(n, generator=generator)[: min(batch_size, n)].to(x.device)
        model.zero_grad(set_to_none=False)
        loss = _minibatch_loss(model, x[idx], y[idx])
        loss.backward()
        losses.append(loss.item())
        if steps == 1:
            return _flat_grad(model).detach().clone(), losses[0]
        with torch.no_grad():
            for p in params:
                p.sub_(p.grad, alpha=lr)
    theta_h = torch.cat([p.detach().reshape(-1) for p in params])
    return (theta0 - theta_h) / (lr * steps), sum(losses) / len(losses)


def full_gradient(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int
) -> tuple[torch.Tensor, float]:
    """Gradient of the mean loss over the whole partition, and the minibatch variance around it.

    Returns ``(grad f_i, sigma_i^2)`` with ``sigma_i^2 = mean_b ||g_b - grad f_i||^2`` over the disjoint
    minibatches b of size ``batch_size`` (eval mode: dropout off, so the gradient is deterministic).
    """
    model.eval()
    n = x.shape[0]
    batch_grads, sizes = [], []
    for start in range(0, n, batch_size):
        model.zero_grad(set_to_none=False)
        _minibatch_loss(model, x[start : start + batch_size], y[start : start + batch_size]).backward()
        batch_grads.append(_flat_grad(model).detach().clone())
        sizes.append(min(batch_size, n - start))
    weights = torch.tensor(sizes, dtype=torch.float32, device=x.device) / n
    grads = torch.stack(batch_grads)
    full = (weights[:, None] * grads).sum(0)
    variance = float(((grads - full) ** 2).sum(1).mean()) if len(sizes) > 1 else 0.0
    return full, variance


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024):
    """Mean cross-entropy loss and accuracy of ``model`` on (x, y)."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    n = max(1, x.shape[0])
    return total_loss / n, correct / n
