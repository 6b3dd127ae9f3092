"""Loss heads. Each file holds one method; import it here so YAML can use short paths
(``class_path: kd_lightning.losses.FitNet``).

Logit heads: ``CrossEntropy``, ``KLDivergence``, ``LogitMSE``, ``PseudoLabel``, ``DKD``,
``DIST``, ``CTKD``, ``MLKD``, ``WTTM`` (logit standardization: a switch on KD/DKD/MLKD).
Feature heads (on named layers): ``FitNet``, ``AttentionTransfer``,
``SimilarityPreserving``, ``RKD``, ``PKT``, ``NST``, ``CRD``, ``ReviewKD``, ``OFD``, ``VID``,
``KDSVD``, ``AB``, ``FactorTransfer``, ``FSP``, ``CorrelationCongruence``.
"""

from kd_lightning.losses.ab import AB
from kd_lightning.losses.attention import AttentionTransfer
from kd_lightning.losses.base import LossHead
from kd_lightning.losses.cc import CorrelationCongruence
from kd_lightning.losses.ce import CrossEntropy
from kd_lightning.losses.crd import CRD
from kd_lightning.losses.ctkd import CTKD
from kd_lightning.losses.dist import DIST
from kd_lightning.losses.dkd import DKD
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.fitnet import Connector, FitNet
from kd_lightning.losses.fsp import FSP
from kd_lightning.losses.ft import FactorTransfer
from kd_lightning.losses.kd import KLDivergence
from kd_lightning.losses.kdsvd import KDSVD
from kd_lightning.losses.mlkd import MLKD
from kd_lightning.losses.mse import LogitMSE
from kd_lightning.losses.nst import NST
from kd_lightning.losses.ofd import OFD
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput
from kd_lightning.losses.pkt import PKT
from kd_lightning.losses.pseudo_label import PseudoLabel
from kd_lightning.losses.reviewkd import ReviewKD
from kd_lightning.losses.rkd import RKD
from kd_lightning.losses.schedules import (
    Constant,
    EpochWindow,
    LinearWarmup,
    Schedule,
    StepWarmup,
)
from kd_lightning.losses.sp import SimilarityPreserving
from kd_lightning.losses.transformer import AttentionMSE, HiddenStateCosine, HiddenStateMSE
from kd_lightning.losses.vid import VID
from kd_lightning.losses.wttm import WTTM

__all__ = [
    "AB",
    "CorrelationCongruence",
    "FSP",
    "FactorTransfer",
    "KDSVD",
    "OFD",
    "ReviewKD",
    "VID",
    "EpochWindow",
    "CRD",
    "CTKD",
    "DIST",
    "DKD",
    "MLKD",
    "NST",
    "PKT",
    "RKD",
    "WTTM",
    "AttentionMSE",
    "AttentionTransfer",
    "Connector",
    "Constant",
    "CrossEntropy",
    "FeatureHead",
    "FitNet",
    "HiddenStateCosine",
    "HiddenStateMSE",
    "KLDivergence",
    "LinearWarmup",
    "LogitMSE",
    "LossHead",
    "ModelOutput",
    "PseudoLabel",
    "Schedule",
    "SimilarityPreserving",
    "StepWarmup",
    "TeacherOutput",
]
