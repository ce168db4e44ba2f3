"""Full-size check: torchvision ResNet-18/50 (random init, eval mode) -> deformjax ResNet.

    pip install torch==2.14.1 torchvision==0.29.1
    python tools/check_torch_resnet.py

For each depth, a torchvision ``resnet{18,50}(weights=None)`` with randomised batch-norm
statistics and affine parameters (so that they matter) is loaded with
``load_torch_state_dict(..., strict=False)`` into
``ResNet(depth, stage_with_dcn=(False, True, True, True), norm='frozen', ...)`` and
compared, float32, on a 224x224 batch of 2:

* ``dcn_modulated=False``, ``num_classes=1000``: the logits equal torch's (a fresh DCNv1
  backbone is the pretrained ResNet);
* ``dcn_modulated=True``: equal torch's with every conv2 output of layers 2-4 halved
  (mmdet's fresh DCNv2: mask ``sigmoid(0) = 0.5``);
* ``num_classes=None``: C2..C5 equal torch's stage outputs.

Prints the largest difference relative to the largest magnitude for each; exits
non-zero if one exceeds 1e-4.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from deformjax.interop import load_torch_state_dict
from deformjax.models import ResNet

TOLERANCE = 1e-4


def torch_model(depth, gen):
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 1 + 0.2 * torch.randn(c, generator=gen)
            m.bias.data = 0.2 * torch.randn(c, generator=gen)
            m.running_mean.data = 0.2 * torch.randn(c, generator=gen)
            m.running_var.data = 0.5 + torch.rand(c, generator=gen)
    return model


def stages(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        out.append(x)
    return out


def relative(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def main():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    worst = 0.0
    for depth in (18, 50):
        model = torch_model(depth, gen)
        sd = {k: v.numpy() for k, v in model.state_dict().items()}
        with torch.no_grad():
            logits = model(x).numpy()
            feats = [f.numpy().transpose(0, 2, 3, 1) for f in stages(model, x)]
            hooks = [block.conv2.register_forward_hook(lambda m, i, o: o * 0.5)
                     for layer in (model.layer2, model.layer3, model.layer4) for block in layer]
            half = model(x).numpy()
            for h in hooks:
                h.remove()
        checks = []
        for modulated, classes, expected in ((False, 1000, logits), (True, 1000, half),
                                             (False, None, feats)):
            ours = ResNet(depth, stage_with_dcn=(False, True, True, True),
                          dcn_modulated=modulated, norm="frozen", num_classes=classes)
            variables = ours.init(jax.random.key(0), xj[:1])
            part = sd if classes else {k: v for k, v in sd.items() if not k.startswith("fc.")}
            out = jax.jit(ours.apply)(load_torch_state_dict(variables, part, strict=False), xj)
            if classes is None:
                err = max(relative(o, e) for o, e in zip(out, expected))
                label = "C2..C5 (DCNv1, num_classes=None)"
            else:
                err = relative(out, expected)
                label = ("logits, DCNv2 vs torch with conv2 halved" if modulated
                         else "logits, DCNv1 vs torch")
            checks.append((label, err))
            worst = max(worst, err)
        for label, err in checks:
            print(f"ResNet-{depth:<4} {label:<44} max |diff| / max |torch| = {err:.2e}")
    print("OK" if worst <= TOLERANCE else f"FAILED: {worst:.2e} > {TOLERANCE}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
