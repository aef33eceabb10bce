"""The published numbers of Qiu, Rivaz & Xiao, "Is visual explanation with Grad-CAM more reliable
for deeper neural networks?", as data, each with where it comes from in the paper.

Sources: Table 1 (classification), Table 2 (Diff_GradCAM), the text of §4.3 (ANOVA, Tukey claims,
EHR AUC values; Fig. 2 is a bar chart without printed numbers). `exact=False` marks a value the
text gives only roughly; `low`/`high` then give the range the text allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd

CITATION = ("Qiu, Rivaz, Xiao: Is visual explanation with Grad-CAM more reliable for deeper "
            "neural networks? A case study with automatic pneumothorax diagnosis")

# model key -> the paper's label
LABELS = {"vgg16": "VGG16", "vgg19": "VGG19", "resnet18": "ResNet18", "resnet34": "ResNet34",
          "resnet50": "ResNet50", "resnet101": "ResNet101", "vit_small": "ViT Small",
          "vit_base": "ViT Base", "vit_large": "ViT Large"}

# Table 1. The paper prints accuracy in percent (83.70%); stored here as a fraction. No CIs given.
TABLE1 = pd.DataFrame.from_records([
    ("vgg16", 0.8370, 0.8224, 0.8800, 0.9069),
    ("vgg19", 0.8320, 0.7747, 0.9080, 0.9098),
    ("resnet18", 0.8760, 0.8821, 0.8680, 0.9420),
    ("resnet34", 0.8720, 0.8758, 0.8600, 0.9417),
    ("resnet50", 0.8820, 0.8802, 0.8820, 0.9450),
    ("resnet101", 0.8760, 0.8798, 0.8780, 0.9434),
    ("vit_small", 0.8580, 0.8137, 0.8820, 0.9302),
    ("vit_base", 0.8620, 0.8602, 0.8740, 0.9356),
    ("vit_large", 0.8440, 0.8356, 0.8640, 0.9197),
], columns=["model", "accuracy", "precision", "recall", "auc"])

# Table 2: Diff_GradCAM over the test cases, per model.
TABLE2 = pd.DataFrame.from_records([
    ("vgg16", 0.186, 0.212, -0.213, 0.773),
    ("vgg19", 0.166, 0.220, -0.365, 0.715),
    ("resnet18", 0.162, 0.262, -0.366, 0.787),
    ("resnet34", 0.133, 0.273, -0.452, 0.782),
    ("resnet50", 0.142, 0.251, -0.287, 0.801),
    ("resnet101", 0.183, 0.265, -0.320, 0.780),
    ("vit_small", 0.052, 0.143, -0.251, 0.652),
    ("vit_base", 0.081, 0.166, -0.233, 0.786),
    ("vit_large", 0.051, 0.164, -0.319, 0.685),
], columns=["model", "mean", "std", "min", "max"])


@dataclass(frozen=True)
class PaperValue:
    value: float
    exact: bool
    source: str
    low: Optional[float] = None
    high: Optional[float] = None


_VIT_RANGE = ("§4.3: 'the EHR AUC improved gradually with the increasing size of the architecture, "
              "ranging from 0.0145 to 0.0171'")
_RESNET_RANGE = ("§4.3: 'ResNet18, ResNet34, and ResNet50 scored similarly in the range of 0.21~0.23, "
                 "generally lower than those of VGG models'; printed 0.21~0.23, read as 0.021-0.023 "
                 "because the same sentence puts them below VGG16's 0.0243")

# EHR AUC (the paper's definition), quoted in the text of §4.3 only.
EHR_AUC = {
    "resnet101": PaperValue(0.0319, True, "§4.3: 'ResNet101 leading the scores at 0.0319'"),
    "vgg16": PaperValue(0.0243, True, "§4.3: 'VGG16 ranking the second at 0.0243'"),
    "vgg19": PaperValue(0.0243, False, "§4.3: 'Compared with VGG16, the EHR AUC score of VGG19 was "
                                       "very similar'; no number given", 0.021, 0.0243),
    "resnet18": PaperValue(0.022, False, _RESNET_RANGE, 0.021, 0.023),
    "resnet34": PaperValue(0.022, False, _RESNET_RANGE, 0.021, 0.023),
    "resnet50": PaperValue(0.022, False, _RESNET_RANGE, 0.021, 0.023),
    "vit_small": PaperValue(0.0145, False, _VIT_RANGE + "; the smallest ViT taken as the lower end",
                            0.0145, 0.0145),
    "vit_base": PaperValue(0.0158, False, _VIT_RANGE + "; between the two ends", 0.0145, 0.0171),
    "vit_large": PaperValue(0.0171, False, _VIT_RANGE + "; the largest ViT taken as the upper end",
                            0.0171, 0.0171),
}

# §4.3: "the ANOVA test showed a group-wise difference (p < 0.001)" for Diff_GradCAM.
ANOVA_P_BELOW = 0.001

# §4.3 Tukey claims on Diff_GradCAM: (model a, model b, significant at p < 0.05, quote).
_CROSS = ("§4.3: 'Between VGG and ResNet models, comparisons between ResNet18, ResNet50, VGG16, "
          "and VGG19 did not yield any significant differences (p > 0.05)'")
_VITS = "§4.3: 'the ViT models also don't differ significantly (p > 0.05)'"
TUKEY_CLAIMS = pd.DataFrame.from_records([
    ("vgg16", "vgg19", False, "§4.3: 'the scores for VGG16 and VGG19 were similar (p > 0.05)'"),
    ("vit_small", "vit_base", False, _VITS),
    ("vit_small", "vit_large", False, _VITS),
    ("vit_base", "vit_large", False, _VITS),
    ("resnet34", "resnet101", True, "§4.3: 'ResNet101's score was significantly higher than ResNet34 (p < 0.05)'"),
    ("vgg16", "resnet18", False, _CROSS),
    ("vgg16", "resnet50", False, _CROSS),
    ("vgg19", "resnet18", False, _CROSS),
    ("vgg19", "resnet50", False, _CROSS),
], columns=["model_a", "model_b", "paper_significant", "source"])


def ehr_table() -> pd.DataFrame:
    """EHR_AUC as a table: model, paper_ehr_auc, paper_ehr_exact, paper_ehr_low/high, paper_ehr_source."""
    return pd.DataFrame([{"model": model, "paper_ehr_auc": v.value, "paper_ehr_exact": v.exact,
                          "paper_ehr_low": v.low if v.low is not None else v.value,
                          "paper_ehr_high": v.high if v.high is not None else v.value,
                          "paper_ehr_source": v.source} for model, v in EHR_AUC.items()])


# The external anchor for pixel AUPRC (docs/STUDY.md §9): Arun et al. 2021, "Assessing the
# trustworthiness of saliency maps for localizing abnormalities in medical imaging" (Radiology:
# Artificial Intelligence), on SIIM-ACR pneumothorax: eight saliency methods 0.024-0.224, a
# U-Net trained on the masks 0.404.
ARUN_AUPRC = {"saliency_low": 0.024, "saliency_high": 0.224, "unet": 0.404,
              "source": "Arun et al. 2021, Radiology: AI, SIIM-ACR pneumothorax, pixel AUPRC"}
