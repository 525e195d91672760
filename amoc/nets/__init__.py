from amoc.nets.dual_bn import DualBatchNorm, DualBatchNorm1d, DualBatchNorm2d, bn_branch, set_bn_branch
from amoc.nets.resnet import Encoder, build_encoder

__all__ = [
    "DualBatchNorm",
    "DualBatchNorm1d",
    "DualBatchNorm2d",
    "bn_branch",
    "set_bn_branch",
    "Encoder",
    "build_encoder",
]
