"""DLG's gradient distance on the papers' sigmoid LeNets, and its gradient, written out for many victims.

The generic path (torch.func: a vmap of grad of grad) serves any model. For the LeNets, whose layers
are only convolutions, sigmoids and one Linear, the same numbers follow from a few explicit passes in
which every victim is one group of a grouped convolution: the site's forward and backward pass, then
the reverse of both. Each pass is a handful of large operations instead of the generic path's many
small ones, which is what makes the engine fast where the reference spends its time on overhead.

Layout: a layer's activations for V victims with B images each are one B x (V*channels) x H x W tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medpfl.models.lenet import LeNet

_conv_backward = torch.ops.aten.convolution_backward


def _join(a: torch.Tensor, b: torch.Tensor, groups: int, axis: int) -> torch.Tensor:
    """Concatenate two grouped tensors group by group; `axis` holds groups x channels (1 for B x (V*C) x H x W
    activations, 0 for (V*out) x in x k x k weights), so two convolutions can run as one."""
    parts = [t.unflatten(axis, (groups, -1)) for t in (a, b)]
    return torch.cat(parts, axis + 1).flatten(axis, axis + 1)


class _Conv:
    """One conv layer of the LeNet with V victims' weights as groups.

    Every convolution runs unpadded on explicitly padded input: oneDNN's fast kernels do not take
    padding as wide as the kernel (CPL's k=2, pad=2), and the slow path costs up to 7x. For the same
    reason a stride-1 layer's input gradient is a plain convolution with the flipped kernel.
    """

    def __init__(self, conv: nn.Conv2d, name: str, params: dict[str, torch.Tensor]) -> None:
        weight = params[f"{name}.weight"]
        self.V = weight.shape[0]
        self.name, self.stride, self.padding = name, conv.stride, conv.padding
        self.kernel = weight.shape[-1]
        self.weight = weight.reshape(-1, *weight.shape[2:])  # (V*out) x in x k x k
        self.bias = params[f"{name}.bias"].reshape(-1)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding[0]
        return F.pad(x, (p, p, p, p)) if p else x

    def __call__(self, x_padded: torch.Tensor, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        return F.conv2d(x_padded, weight, bias, self.stride, 0, groups=self.V)

    def input_grad(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient w.r.t. the (unpadded) input x of the convolution with `weight`, at `grad_out`."""
        weight = self.weight if weight is None else weight
        if self.stride != (1, 1):
            return _conv_backward(grad_out, x, weight, None, self.stride, self.padding, [1, 1], False, [0, 0],
                                  self.V, [True, False, False])[0]
        V, k = self.V, self.kernel
        per_victim = weight.reshape(V, -1, *weight.shape[1:])  # V x out x in x k x k
        flipped = per_victim.transpose(1, 2).flip(-1, -2).reshape(-1, per_victim.shape[1], k, k)
        q = k - 1 - self.padding[0]  # pad (or crop, when negative) the output gradient by this much
        grad_out = F.pad(grad_out, (q, q, q, q)) if q >= 0 else grad_out[..., -q:q, -q:q]
        return F.conv2d(grad_out, flipped, None, 1, 0, groups=V)

    def weight_grad(self, grad_out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-victim weight and bias gradients, summed over the batch."""
        _, g_w, g_b = _conv_backward(grad_out, x, self.weight, [self.weight.shape[0]], self.stride, self.padding,
                                     [1, 1], False, [0, 0], self.V, [False, True, True])
        return g_w, g_b


def lenet_gradient_distance(
    model: LeNet, z: torch.Tensor, params: dict[str, torch.Tensor], observed: dict[str, torch.Tensor],
    targets: torch.Tensor | None, batch: int, shape: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per victim, the squared L2 distance between the LeNet gradient of its candidate and the observed one,
    and the distance's gradient w.r.t. the candidate (images, then soft-label logits when targets is None).

    z: V x (B*C*H*W [+ B*K]); params/observed: name -> V x shape; targets: V x B x K or None.
    """
    V, B = z.shape[0], batch
    C, H, W = shape
    n_pixels = B * C * H * W
    x = z[:, :n_pixels].reshape(V, B, C, H, W).transpose(0, 1).reshape(B, V * C, H, W)
    soft = targets is None
    if soft:
        targets = z[:, n_pixels:].reshape(V, B, -1).softmax(-1)
    convs = [_Conv(layer, f"body.{i}", params) for i, layer in enumerate(model.body) if isinstance(layer, nn.Conv2d)]
    w_fc, b_fc = params["fc.weight"], params["fc.bias"]  # V x K x F, V x K

    # The site's forward pass and its cross-entropy (mean over the batch, probability targets).
    acts, padded = [x], []
    for conv in convs:
        padded.append(conv.pad(acts[-1]))
        acts.append(torch.sigmoid(conv(padded[-1], bias=conv.bias)))
    feat = acts[-1].reshape(B, V, -1).transpose(0, 1)  # V x B x F
    p = torch.baddbmm(b_fc[:, None, :], feat, w_fc.transpose(1, 2)).softmax(-1)
    mass = targets.sum(-1, keepdim=True)
    d_logits = (p * mass - targets) / B

    # The site's backward pass: its gradient, and the residual against the observed one. The distance's
    # derivative w.r.t. the site's gradient is R = 2 (g - o); the classifier's 2 is applied to its
    # (small) products instead, since its K x F residual is by far the largest tensor.
    distance: list[torch.Tensor] = []

    def residual(diff: torch.Tensor) -> torch.Tensor:
        """g - o for one parameter tensor; its squared norm joins the distance."""
        flat = diff.reshape(V, 1, -1)
        distance.append(torch.bmm(flat, flat.transpose(1, 2)).reshape(V))
        return diff

    def observed_like(name: str, gradient: torch.Tensor) -> torch.Tensor:
        return observed[name].reshape(gradient.shape)

    diff_wfc = residual(torch.baddbmm(observed["fc.weight"], d_logits.transpose(1, 2), feat, beta=-1))
    g_bfc = d_logits.sum(1)
    r_bfc = 2 * residual(g_bfc - observed_like("fc.bias", g_bfc))
    d_act = torch.bmm(d_logits, w_fc).transpose(0, 1).reshape(acts[-1].shape)  # d loss / d last activation
    # Per layer: gradient w.r.t. its output and pre-activation, the sigmoid's slope, 2 (g - o) of weight and bias.
    d_acts, d_pre, slopes, r_w, r_b = ([None] * len(convs) for _ in range(5))
    for i in reversed(range(len(convs))):
        conv, a = convs[i], acts[i + 1]
        slopes[i] = a * (1 - a)
        d_acts[i], d_pre[i] = d_act, d_act * slopes[i]
        g_w, g_b = conv.weight_grad(d_pre[i], acts[i])
        if i > 0:
            d_act = conv.input_grad(d_pre[i], acts[i])
        r_w[i] = 2 * residual(g_w - observed_like(f"{conv.name}.weight", g_w))
        r_b[i] = 2 * residual(g_b - observed_like(f"{conv.name}.bias", g_b))
    loss = torch.stack(distance).sum(0)

    # Reverse of the backward pass, first layer up: adjoints of each layer's pre-activation gradient
    # (from its weight, bias and input gradients) and of its output (through the sigmoid's slope).
    act_bar: list[torch.Tensor | None] = [None] * len(acts)

    def accumulate(i: int, contribution: torch.Tensor) -> None:
        act_bar[i] = contribution if act_bar[i] is None else act_bar[i].add_(contribution)

    d_act_bar = None
    for i, conv in enumerate(convs):
        if d_act_bar is None:
            d_pre_bar = conv(padded[i], r_w[i], r_b[i])
        else:  # weight-gradient and input-gradient adjoints in one convolution
            both = _join(padded[i], conv.pad(d_act_bar), conv.V, 1)
            d_pre_bar = conv(both, torch.cat([r_w[i], conv.weight], 1), r_b[i])
        d_act_bar = d_pre_bar * slopes[i]
        # d_pre = d_act * a (1 - a): its adjoint w.r.t. a is d_pre_bar * d_act * (1 - 2a).
        accumulate(i + 1, d_pre_bar.mul_(torch.addcmul(d_acts[i], d_acts[i], acts[i + 1], value=-2)))

    # ... through the classifier's gradient and the cross-entropy's ...
    d_feat_bar = d_act_bar.reshape(B, V, -1).transpose(0, 1)
    d_logits_bar = (torch.bmm(d_feat_bar, w_fc.transpose(1, 2)) + 2 * torch.bmm(feat, diff_wfc.transpose(1, 2))
                    + r_bfc[:, None])
    p_bar = d_logits_bar * mass / B
    logits_bar = p * (p_bar - (p_bar * p).sum(-1, keepdim=True))
    feat_bar = torch.bmm(2 * d_logits, diff_wfc).add_(torch.bmm(logits_bar, w_fc))
    accumulate(len(convs), feat_bar.transpose(0, 1).reshape(acts[-1].shape))

    # ... and of the forward pass, top layer down, to the images; each layer's input also receives the
    # adjoint of its weight gradient (through d_pre), in the same convolution.
    for i in reversed(range(len(convs))):
        conv = convs[i]
        grads = _join(d_pre[i], act_bar[i + 1].mul_(slopes[i]), conv.V, 1)
        accumulate(i, conv.input_grad(grads, acts[i], _join(r_w[i], conv.weight, conv.V, 0)))
    x_bar = act_bar[0].reshape(B, V, C * H * W).transpose(0, 1).reshape(V, n_pixels)
    if not soft:
        return loss, x_bar
    # Soft labels: d/dt of (p * sum(t) - t) / B, then through the softmax that makes t.
    t_bar = ((d_logits_bar * p).sum(-1, keepdim=True) - d_logits_bar) / B
    label_bar = targets * (t_bar - (t_bar * targets).sum(-1, keepdim=True))
    return loss, torch.cat([x_bar, label_bar.reshape(V, -1)], dim=1)
