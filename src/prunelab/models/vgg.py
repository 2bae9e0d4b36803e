"""VGG-16 convolutional body for CIFAR with the classifier heads of SNIP, PFP and NNrelief."""

from __future__ import annotations

from torch import nn

from .registry import check_choice, register

# VGG-16 ("D", Simonyan & Zisserman 2015) conv configuration; 'M' = 2x2 max-pool. 32x32 -> 1x1.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

# Classifier heads, all reading the 512 features of the 1x1 map; parameter counts for 10 classes.
CLASSIFIERS = {
    # PFP/torchprune VGG-16-BN (bearpaw pytorch-classification `models/cifar/vgg.py`): 14,728,266.
    "pfp": "single fc 512->n (PFP VGG-16-BN)",
    # SNIP VGG-like (Zagoruyko's cifar.torch, without dropout; `snip/network.py`): 14,991,946.
    "like": "fc 512->512, BN, ReLU, fc 512->n (SNIP VGG-like)",
    # SNIP VGG-D (`snip/network.py`, version 'D'): 15,255,626.
    "snip-d": "2 x (fc 512->512, BN, ReLU), fc 512->n (SNIP VGG-D)",
    # NNrelief VGG-16 (`models.py`): 15,253,578.
    "nnrelief": "2 x (Dropout 0.5, fc 512->512, ReLU), fc 512->n (NNrelief VGG-16)",
    # NNrelief VGG-like (`models.py`): 14,990,922.
    "nnrelief-like": "Dropout 0.5, fc 512->512, ReLU, fc 512->n (NNrelief VGG-like)",
}


def _classifier(kind: str, num_classes: int) -> nn.Sequential:
    def hidden(bn: bool, dropout: bool):
        layers = [nn.Dropout(0.5)] if dropout else []
        layers.append(nn.Linear(512, 512))
        if bn:
            layers.append(nn.BatchNorm1d(512))
        return layers + [nn.ReLU()]

    n_hidden = {"pfp": 0, "like": 1, "snip-d": 2, "nnrelief": 2, "nnrelief-like": 1}[kind]
    snip = kind in ("like", "snip-d")  # SNIP swaps dropout for BN; NNrelief keeps dropout, no BN
    layers = []
    for _ in range(n_hidden):
        layers += hidden(bn=snip, dropout=not snip)
    return nn.Sequential(*layers, nn.Linear(512, num_classes))


class VGG(nn.Module):
    """VGG-16 body for 32x32 inputs: 13 conv 3x3 (pad 1, with bias) each followed by BN and ReLU.

    Sources: Simonyan & Zisserman 2015 (configuration D); Zagoruyko 2015, "92.45% on CIFAR-10 in Torch"
    (VGG-like); SNIP `snip/network.py`; PFP via bearpaw/pytorch-classification; NNrelief `models.py`.
    The head is chosen by `classifier`, see CLASSIFIERS. Modules: `features`, `flatten`, `classifier`.
    """

    def __init__(self, num_classes: int = 10, classifier: str = "pfp", cfg=VGG16_CFG):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = _classifier(classifier, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


_LIKE = ("like", "nnrelief-like")


def _vgg16(num_classes, classifier="pfp"):
    return VGG(num_classes, check_choice("classifier", classifier, CLASSIFIERS))


def _vgg_like(num_classes, classifier="like"):
    return VGG(num_classes, check_choice("classifier", classifier, _LIKE))


def _describe(kinds):
    return "; ".join(f"{k} = {CLASSIFIERS[k]}" for k in kinds)


register("vgg16", "VGG-16 with BN for CIFAR, classifier head selectable", "cifar10", (3, 32, 32), _vgg16,
         {"classifier": f"head: {_describe(CLASSIFIERS)} (default pfp)"})
register("vgg-like", "VGG-like (Zagoruyko) for CIFAR: VGG-16 convs + fc 512 + fc 10", "cifar10",
         (3, 32, 32), _vgg_like, {"classifier": f"head: {_describe(_LIKE)} (default like)"})
