"""How good the global model is: clean metrics (and, beside them, robustness and explanations)."""

from fedclinic.evaluation.metrics import (SCORES, backdoor_success_rate, balanced_accuracy, box_iou, confusion_matrix,
                                        evaluate, macro_f1, summarize)

__all__ = ["SCORES", "backdoor_success_rate", "balanced_accuracy", "box_iou", "confusion_matrix", "evaluate", "macro_f1",
           "summarize"]
