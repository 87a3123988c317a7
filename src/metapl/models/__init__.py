"""Models by name: ``create_model(name, num_classes, **kwargs)``, ``list_models()``.

Every model maps ``x`` to logits, takes a ``dropout`` option (applied before the classifier, as the
paper does for both teacher and student), uses BatchNorm decay 0.99 where it has BatchNorm, and works
with ``torch.func.functional_call`` and forward-mode AD (the exact MPL step's JVP).
"""

from metapl.models import efficientnet, resnet, small, wrn  # noqa: F401  (registers the models)
from metapl.models.param_groups import param_groups_for_weight_decay
from metapl.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "param_groups_for_weight_decay", "register_model"]
