"""Components for MAE self pre-training of Vision Transformers on medical images.

The MONAI bundles in ``bundles/`` reference these modules; everything MONAI already
provides (engines, handlers, transforms, metrics, UNETR blocks) is used from MONAI directly.
"""

__version__ = "0.1.0"

from . import errors

# a user error (missing datalist, bad checkpoint, wrong setting) ends a run with its message, not
# MONAI's config-machinery traceback; SELFMEDMAE_TRACEBACK=1 shows the traceback (errors.py)
errors.install()
