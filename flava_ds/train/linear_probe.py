"""Linear probe on frozen image-encoder features: the paper's vision evaluation (CLIP's protocol).

The image encoder's post-LN CLS state of every train and validation image is extracted once; a multinomial
logistic regression with L2 penalty is fitted on the train features by full-batch L-BFGS (as scikit-learn's
`LogisticRegression` does), its penalty chosen on a held-out fifth of the train set from a log grid, then refitted
on the whole train set and scored on the validation set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PENALTIES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def image_features(model, batches, device: torch.device) -> torch.Tensor:
    """(N, H) float32 features on the CPU of image batches (dicts with `pixel_values`)."""
    features = []
    for batch in batches:
        pixels = batch["pixel_values"].to(device)
        cls = torch.zeros(pixels.shape[0], 1, dtype=torch.long, device=device)  # only CLS on the last block
        features.append(model.image_encoder(pixels, None, cls)[1][:, 0].float().cpu())
    return torch.cat(features)


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, classes: int, penalty: float, max_iter: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (classes, H), bias (classes,)) minimising mean cross-entropy + penalty * |weight|^2 / 2."""
    weight = torch.zeros(classes, features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    x, y = features.double(), labels.long()
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.t() + bias, y) + penalty / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((features.double() @ weight.t() + bias).argmax(-1) == labels).double().mean())


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], classes: int
) -> dict[str, float]:
    """Top-1 validation accuracy of the probe fitted on `train` (features, labels), penalty chosen on a split."""
    (x, y), (x_val, y_val) = train, val
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardised with the train statistics
    x, x_val = (x - mean) / std, (x_val - mean) / std
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    held, fit = order[: max(1, len(x) // 5)], order[max(1, len(x) // 5) :]
    scores = {p: _accuracy(*fit_logistic_regression(x[fit], y[fit], classes, p), x[held], y[held]) for p in PENALTIES}
    best = max(PENALTIES, key=lambda p: (scores[p], p))  # ties: the stronger penalty
    weight, bias = fit_logistic_regression(x, y, classes, best)
    return {
        "linear_probe/top1": _accuracy(weight, bias, x_val, y_val),
        "linear_probe/penalty": best,
        "linear_probe/majority": float(torch.bincount(y_val, minlength=classes).max() / len(y_val)),
    }
