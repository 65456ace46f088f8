"""Components for MAE self pre-training of Vision Transformers on medical images.

The MONAI bundles in ``bundles/`` reference these modules; everything MONAI already
provides (engines, handlers, transforms, metrics, UNETR blocks) is used from MONAI directly.

Importing the package changes nothing global: the short ``error: <message>`` form of a user error
(errors.py) is switched on by whoever runs, the bundle configs' first ``run`` expression and the
``main`` of each tool in ``tools/``.
"""

__version__ = "0.1.0"

from . import errors  # noqa: F401  (selfmedmae_components.errors.install() in the configs)
