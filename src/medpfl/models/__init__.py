"""Model zoo: the papers' sigmoid LeNets, a small ConvNet, ResNet-18 (BatchNorm or GroupNorm), initialisers."""

from medpfl.models.convnet import ConvNet
from medpfl.models.init import INIT_SCHEMES, init_weights
from medpfl.models.lenet import LENET_LAYERS, LeNet, conv_output_size, lenet_feature_size
from medpfl.models.norms import NORMS, group_count, make_norm
from medpfl.models.registry import MODELS, ModelEntry, build_model, model_names, register_model
from medpfl.models.resnet import BasicBlock, ResNet18

__all__ = [
    "BasicBlock",
    "ConvNet",
    "INIT_SCHEMES",
    "LENET_LAYERS",
    "LeNet",
    "MODELS",
    "ModelEntry",
    "NORMS",
    "ResNet18",
    "build_model",
    "conv_output_size",
    "group_count",
    "init_weights",
    "lenet_feature_size",
    "make_norm",
    "model_names",
    "register_model",
]
