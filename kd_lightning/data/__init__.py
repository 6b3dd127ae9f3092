"""DataModules. Every batch is a dict ``{"image", "label", "index"}``."""

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from kd_lightning.data.imagefolder import ImageFolderDataModule as ImageFolderDataModule
from kd_lightning.data.lm import MovieReviewsLMDataModule, PromptCompletionDataModule
from kd_lightning.data.mnist import BundledMNISTDataModule, FashionMNISTDataModule, MNISTDataModule
from kd_lightning.data.streaming import StreamingImageDataModule as StreamingImageDataModule
from kd_lightning.data.text import HFTextDataModule, RottenTomatoesDataModule, TextDataModule
from kd_lightning.data.text_augment import TextAugmentTransfer
from kd_lightning.data.transfer import (
    ArrayFileSource,
    AugmentedCopies,
    TextFileSource,
    TextTransferSource,
    TransferSource,
)

__all__ = [
    "ArrayFileSource",
    "AugmentedCopies",
    "BundledMNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "HFTextDataModule",
    "KDDataModule",
    "MNISTDataModule",
    "MovieReviewsLMDataModule",
    "PromptCompletionDataModule",
    "RottenTomatoesDataModule",
    "TextAugmentTransfer",
    "TextDataModule",
    "TextFileSource",
    "TextTransferSource",
    "TransferSource",
]
