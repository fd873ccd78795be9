"""DLG's gradient distance on the papers' sigmoid LeNets, and its gradient, written out for many victims.

The generic path (torch.func: a vmap of grad of grad) serves any model. For the LeNets, whose layers
are only convolutions, sigmoids and one Linear, the same numbers follow from a few explicit passes in
which every victim is one group of a grouped convolution: the site's forward and backward pass, then
the reverse of both. Each pass is a handful of large operations instead of the generic path's many
small ones, which is what makes the engine fast where the reference spends its time on overhead.

Layout: a layer's activations for V victims with B images each are one B x (V*channels) x H x W tensor,
stored channels-last. oneDNN's direct convolution kernels read and write that layout as it is; in the
default layout the same grouped convolutions reorder every input and output or fall back to im2col and
a matrix multiply, measured 2-7x slower per convolution on the LeNets' shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medpfl.models.lenet import LeNet

_conv_backward = torch.ops.aten.convolution_backward
_through_sigmoid = torch.ops.aten.sigmoid_backward  # (g, a) -> g * a * (1 - a), one fused pass


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _features(act: torch.Tensor, V: int) -> torch.Tensor:
    """The classifier's input, V x B x (H*W*C), from the last layer's channels-last activations."""
    B, _, H, W = act.shape
    return act.permute(0, 2, 3, 1).reshape(B, H * W, V, -1).permute(2, 0, 1, 3).reshape(V, B, -1)


def _activations(features: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of _features: V x B x (H*W*C) back to a channels-last B x (V*C) x H x W like `like`."""
    V, B, _ = features.shape
    _, VC, H, W = like.shape
    per_victim = features.reshape(V, B, H, W, VC // V).permute(1, 2, 3, 0, 4)  # B x H x W x V x C
    return per_victim.reshape(B, H, W, VC).permute(0, 3, 1, 2)


class _Conv:
    """One conv layer of the LeNet with V victims' weights as groups.

    Every convolution, weight gradients included, runs unpadded on explicitly padded input: oneDNN's
    direct kernels do not take padding as wide as the kernel (CPL's k=2, pad=2), and its fallback costs
    up to 7x. For the same reason a stride-1 layer's input gradient is a plain convolution with the
    flipped kernel.
    """

    def __init__(self, conv: nn.Conv2d, name: str, params: dict[str, torch.Tensor],
                 observed: dict[str, torch.Tensor], support: dict[str, torch.Tensor] | None = None) -> None:
        weight = params[f"{name}.weight"]
        self.V, self.kernel = weight.shape[0], weight.shape[-1]
        self.stride, self.padding = conv.stride, conv.padding
        # (V*out) x in x k x k, channels-last like everything a convolution meets (else it copies them)
        self.weight = _channels_last(weight.reshape(-1, *weight.shape[2:]))
        self.bias = params[f"{name}.bias"].reshape(-1)
        self.observed_weight = _channels_last(observed[f"{name}.weight"].reshape(self.weight.shape))
        self.observed_bias = observed[f"{name}.bias"].reshape(-1)
        self.support_weight = None if support is None else _channels_last(
            support[f"{name}.weight"].reshape(self.weight.shape))
        self.support_bias = None if support is None else support[f"{name}.bias"].reshape(-1)
        if self.stride == (1, 1):
            self.flipped = self.flip(self.weight)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding[0]
        return F.pad(x, (p, p, p, p)) if p else x

    def __call__(self, x_padded: torch.Tensor, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        return F.conv2d(x_padded, weight, bias, self.stride, 0, groups=self.V)

    def input_grad(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient w.r.t. the (unpadded) input x of the convolution with `weight` (this layer's by default),
        at `grad_out`."""
        if self.stride != (1, 1):
            return _conv_backward(grad_out, x, self.weight if weight is None else weight, None, self.stride,
                                  self.padding, [1, 1], False, [0, 0], self.V, [True, False, False])[0]
        q = self.kernel - 1 - self.padding[0]  # pad (or crop, when negative) the output gradient by this much
        grad_out = F.pad(grad_out, (q, q, q, q)) if q >= 0 else _channels_last(grad_out[..., -q:q, -q:q])
        return F.conv2d(grad_out, self.flipped if weight is None else self.flip(weight), None, 1, 0, groups=self.V)

    def flip(self, weight: torch.Tensor) -> torch.Tensor:
        """A (V*out) x in x k x k kernel flipped, in and out swapped: (V*in) x out x k x k."""
        per_victim = weight.reshape(self.V, -1, *weight.shape[1:])
        flipped = per_victim.transpose(1, 2).flip(-1, -2).reshape(-1, per_victim.shape[1], self.kernel, self.kernel)
        return _channels_last(flipped)

    def weight_grad(self, grad_out: torch.Tensor, x_padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-victim weight and bias gradients, summed over the batch."""
        _, g_w, g_b = _conv_backward(grad_out, x_padded, self.weight, [self.weight.shape[0]], self.stride, [0, 0],
                                     [1, 1], False, [0, 0], self.V, [False, True, True])
        return g_w, g_b


def _one_minus(p: torch.Tensor) -> torch.Tensor:
    """1 - p for softmax outputs p (last dimension), accurate where p is within float epsilon of 1: for
    the largest entry it is the sum of the others. A confident model's gradient (p_y - 1) lives there."""
    top = F.one_hot(p.argmax(-1), p.shape[-1]).bool()
    return torch.where(top, p.masked_fill(top, 0).sum(-1, keepdim=True), 1 - p)


def _centred(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """v - sum_i p_i v_i over the last dimension, as sum_i p_i (v - v_i): no cancellation where one p_i
    is near 1 (K x K per image; K is the number of classes)."""
    return (p[..., None, :] * (v[..., :, None] - v[..., None, :])).sum(-1)


def _victim_sums(t: torch.Tensor, V: int) -> torch.Tensor:
    """Sum of each victim's entries of a tensor whose first dimension holds V victims' rows."""
    return t.unflatten(0, (V, -1)).flatten(1).sum(1)


def per_entry(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-victim values c (V) broadcast against a tensor whose first dimension holds V victims' rows."""
    return c.repeat_interleave(like.shape[0] // c.shape[0]).view(-1, *[1] * (like.dim() - 1))


def _half_adjoints(site: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], V: int,
                   distance: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The distance per victim between gradients g and observed o, over the entries each `support`
    (1 kept, 0 left out; None: all) holds, and half its derivative w.r.t. each g.

    "l2": sum |g - o|^2. "cosine": 1 - <g, o> / (|g| |o|), blind to the update's scale (clipping, a
    quantizer's step) and, summed over many entries, less swayed by noise on each than L2."""
    masked = [(g if s is None else g * s, o if s is None else o * s, s) for g, o, s in site]
    if distance == "l2":
        halves = [g - o for g, o, _ in masked]
        loss = sum(_victim_sums(h.square(), V) for h in halves)
        return loss, halves
    if distance != "cosine":
        raise ValueError(f"unknown distance {distance!r}; use 'l2' or 'cosine'")
    dot = sum(_victim_sums(g * o, V) for g, o, _ in masked)
    g_norm = sum(_victim_sums(g.square(), V) for g, _, _ in masked).clamp_min(1e-30).sqrt()
    o_norm = sum(_victim_sums(o.square(), V) for _, o, _ in masked).clamp_min(1e-30).sqrt()
    loss = 1 - dot / (g_norm * o_norm)
    # d loss / d g = -o / (|g| |o|) + <g, o> g / (|g|^3 |o|), on the support only; halved.
    along_o, along_g = -0.5 / (g_norm * o_norm), 0.5 * dot / (g_norm ** 3 * o_norm)
    halves = []
    for g, o, s in masked:
        half = per_entry(along_o, o) * o + per_entry(along_g, g) * g
        halves.append(half if s is None else half * s)
    return loss, halves


class LeNetGradientDistance:
    """Per victim, the distance (squared L2, or cosine) between the LeNet gradient of its candidate and its
    observed gradient on the `support` (name -> V x shape, 1 kept, 0 left out; None: all), and the
    distance's gradient w.r.t. the candidate (images, then soft-label logits when `targets` is None):
    set up once for a set of victims, then evaluated for many candidates.

    params/observed: name -> V x shape; targets: V x B x K or None; candidates z: V x (B*C*H*W [+ B*K]).
    `logit_gradient` (V x B x K): the site's gradient w.r.t. its logits, when the attacker read it off the
    update; the candidate's gradient is then the backward pass of that one vector, so no softmax is taken.
    """

    def __init__(self, model: LeNet, params: dict[str, torch.Tensor], observed: dict[str, torch.Tensor],
                 targets: torch.Tensor | None, batch: int, shape: tuple[int, int, int],
                 logit_gradient: torch.Tensor | None = None, support: dict[str, torch.Tensor] | None = None,
                 distance: str = "l2") -> None:
        self.batch, self.shape, self.targets, self.logit_gradient = batch, shape, targets, logit_gradient
        self.distance = distance
        self.convs = [_Conv(layer, f"body.{i}", params, observed, support)
                      for i, layer in enumerate(model.body) if isinstance(layer, nn.Conv2d)]
        # The classifier's weights with their features in the order channels-last activations hold them.
        V, K, _ = params["fc.weight"].shape
        channels = model.body[-2].out_channels

        def channels_last_features(weight: torch.Tensor) -> torch.Tensor:
            return weight.reshape(V, K, channels, -1).transpose(2, 3).reshape(V, K, -1)

        self.w_fc, self.b_fc = channels_last_features(params["fc.weight"]), params["fc.bias"]  # V x K x F, V x K
        self.observed_w_fc = channels_last_features(observed["fc.weight"])
        self.observed_b_fc = observed["fc.bias"]
        self.support_w_fc = None if support is None else channels_last_features(support["fc.weight"])
        self.support_b_fc = None if support is None else support["fc.bias"]

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance per victim, its gradient w.r.t. z) for candidates z."""
        V, B = z.shape[0], self.batch
        C, H, W = self.shape
        n_pixels = B * C * H * W
        convs, w_fc = self.convs, self.w_fc
        x = _channels_last(z[:, :n_pixels].reshape(V, B, C, H, W).transpose(0, 1).reshape(B, V * C, H, W))
        soft = self.targets is None and self.logit_gradient is None
        targets = z[:, n_pixels:].reshape(V, B, -1).softmax(-1) if soft else self.targets

        # The site's forward pass and its cross-entropy (mean over the batch, probability targets).
        acts, padded = [x], []
        for conv in convs:
            padded.append(conv.pad(acts[-1]))
            acts.append(torch.sigmoid(conv(padded[-1], bias=conv.bias)))
        feat = _features(acts[-1], V)  # V x B x F
        if self.logit_gradient is None:
            p = torch.baddbmm(self.b_fc[:, None, :], feat, w_fc.transpose(1, 2)).softmax(-1)
            mass = targets.sum(-1, keepdim=True)
            # (p * mass - targets) / B, without subtracting numbers near 1 (see _one_minus).
            d_logits = (p * (mass - targets) - targets * _one_minus(p)) / B
        else:
            d_logits = self.logit_gradient

        # The site's backward pass: its gradient, then the distance to the observed one and the distance's
        # derivative w.r.t. each gradient tensor, halved (for L2: g - o). The classifier's 2 is applied to
        # its (small) products instead, since its K x F residual is by far the largest tensor.
        site = [(torch.bmm(d_logits.transpose(1, 2), feat), self.observed_w_fc, self.support_w_fc),
                (d_logits.sum(1), self.observed_b_fc, self.support_b_fc)]
        d_act = _activations(torch.bmm(d_logits, w_fc), acts[-1])  # d loss / d last activation
        # Per layer: gradient w.r.t. its output and pre-activation, and its weight and bias gradients.
        d_acts, d_pre = [None] * len(convs), [None] * len(convs)
        for i in reversed(range(len(convs))):
            conv = convs[i]
            d_acts[i], d_pre[i] = d_act, _through_sigmoid(d_act, acts[i + 1])
            g_w, g_b = conv.weight_grad(d_pre[i], padded[i])
            if i > 0:
                d_act = conv.input_grad(d_pre[i], acts[i])
            site += [(g_w, conv.observed_weight, conv.support_weight), (g_b, conv.observed_bias, conv.support_bias)]
        loss, halves = _half_adjoints(site, V, self.distance)
        diff_wfc = halves[0]
        # With the logit gradient read off the update, the bias gradient is the observed one by construction.
        r_bfc = 2 * halves[1] if self.logit_gradient is None else None
        r_w = [None] * len(convs)
        r_b = [None] * len(convs)
        for j, i in enumerate(reversed(range(len(convs)))):
            r_w[i], r_b[i] = 2 * halves[2 + 2 * j], 2 * halves[3 + 2 * j]

        # Reverse of the backward pass, first layer up: adjoints of each layer's pre-activation gradient
        # (from its weight, bias and input gradients) and of its output (through the sigmoid's slope).
        act_bar: list[torch.Tensor | None] = [None] * len(acts)

        def accumulate(i: int, contribution: torch.Tensor) -> None:
            act_bar[i] = contribution if act_bar[i] is None else act_bar[i].add_(contribution)

        d_act_bar = None
        for i, conv in enumerate(convs):
            if d_act_bar is None:
                d_pre_bar = conv(padded[i], r_w[i], r_b[i])
            else:  # weight-gradient and input-gradient adjoints
                d_pre_bar = conv(padded[i], r_w[i], r_b[i]).add_(conv(conv.pad(d_act_bar)))
            d_act_bar = _through_sigmoid(d_pre_bar, acts[i + 1])
            # d_pre = d_act * a (1 - a): its adjoint w.r.t. a is d_pre_bar * d_act * (1 - 2a).
            accumulate(i + 1, d_pre_bar.mul_(torch.addcmul(d_acts[i], d_acts[i], acts[i + 1], value=-2)))

        # ... through the classifier's gradient and the cross-entropy's ...
        feat_bar = torch.bmm(2 * d_logits, diff_wfc)
        if self.logit_gradient is None:
            d_feat_bar = _features(d_act_bar, V)
            d_logits_bar = (torch.bmm(d_feat_bar, w_fc.transpose(1, 2))
                            + 2 * torch.bmm(feat, diff_wfc.transpose(1, 2)) + r_bfc[:, None])
            logits_bar = p * _centred(d_logits_bar * mass / B, p)  # through the softmax's Jacobian
            feat_bar.add_(torch.bmm(logits_bar, w_fc))
        accumulate(len(convs), _activations(feat_bar, acts[-1]))

        # ... and of the forward pass, top layer down, to the images; each layer's input also receives the
        # adjoint of its weight gradient (through d_pre).
        for i in reversed(range(len(convs))):
            conv = convs[i]
            accumulate(i, conv.input_grad(d_pre[i], acts[i], r_w[i]))
            accumulate(i, conv.input_grad(_through_sigmoid(act_bar[i + 1], acts[i + 1]), acts[i]))
        x_bar = act_bar[0].reshape(B, V, C, H, W).transpose(0, 1).reshape(V, n_pixels)
        if not soft:
            return loss, x_bar
        # Soft labels: d/dt of (p * sum(t) - t) / B, then through the softmax that makes t.
        t_bar = -_centred(d_logits_bar, p) / B
        label_bar = targets * (t_bar - (t_bar * targets).sum(-1, keepdim=True))
        return loss, torch.cat([x_bar, label_bar.reshape(V, -1)], dim=1)
