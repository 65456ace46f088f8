"""Components for MAE self pre-training of Vision Transformers on medical images.

The MONAI bundles in ``bundles/`` reference these modules; everything MONAI already
provides (engines, handlers, transforms, metrics, UNETR blocks) is used from MONAI directly.
"""

__version__ = "0.1.0"
