"""LeNets for MNIST: LeNet-300-100, LeNet-5-Caffe (with and without conv ReLUs) and PFP's "LeNet-5"."""

from __future__ import annotations

from torch import nn

from .registry import check_bool, register


class LeNet300100(nn.Module):
    """LeNet-300-100: fully connected 784-300-100-n with ReLU (LeCun et al. 1998).

    As used by SNIP (`snip/network.py`), PFP, NNrelief and LOBSTER. 266,610 parameters for n=10.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(784, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


class LeNet5Caffe(nn.Module):
    """LeNet-5-Caffe: Caffe's MNIST LeNet (`caffe/examples/mnist/lenet_train_test.prototxt`).

    conv 1->20 5x5 -> maxpool 2 -> conv 20->50 5x5 -> maxpool 2 -> fc 800->500 -> ReLU -> fc 500->n;
    431,080 parameters for n=10. Caffe's net, and SNIP's copy (`snip/network.py`), have *no* ReLU after
    the convs (relu=False). NNrelief (`models.py`) and LOBSTER (`architectures.py`) add one after each
    conv (relu=True). Without them the ReLUs are nn.Identity, so parameter names do not change.
    """

    def __init__(self, num_classes: int = 10, relu: bool = False):
        super().__init__()
        act = nn.ReLU if relu else nn.Identity
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.relu1 = act()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.relu2 = act()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc3 = nn.Linear(4 * 4 * 50, 500)
        self.relu3 = nn.ReLU()
        self.fc4 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc3(self.flatten(x)))
        return self.fc4(x)


class PFPLeNet5(nn.Module):
    """PFP's "LeNet-5" (Liebenwein et al. 2020, torchprune): the PyTorch-tutorial LeNet on 32x32 MNIST.

    conv1 1->6 3x3, ReLU, maxpool 2 (32->30->15); conv2 6->16 3x3, ReLU, maxpool 2 (15->13->6);
    "fc1" as a conv 16->120 6x6 (6->1), ReLU; fc2 120->84, ReLU; fc3 84->n. 81,194 parameters for n=10,
    the count PFP reports. This is not LeNet-5-Caffe.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Conv2d(16, 120, 6)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(self.relu3(self.fc1(x)))
        return self.fc3(self.relu4(self.fc2(x)))


def _lenet5_caffe(num_classes, relu=False):
    return LeNet5Caffe(num_classes, relu=check_bool("relu", relu))


register("lenet300-100", "LeNet-300-100: MLP 784-300-100-10 with ReLU", "mnist", (1, 28, 28),
         LeNet300100)
register("lenet5-caffe", "LeNet-5-Caffe: 2 conv (20, 50 @5x5) + fc 500 + fc 10", "mnist", (1, 28, 28),
         _lenet5_caffe,
         {"relu": "ReLU after each conv: False = Caffe/SNIP, True = NNrelief/LOBSTER (default False)"})
register("pfp-lenet5", "PFP's LeNet-5 (PyTorch-tutorial net, fc1 as a 6x6 conv) on 32x32 MNIST", "mnist32",
         (1, 32, 32), PFPLeNet5)
