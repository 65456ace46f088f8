"""Every module the bundle configs name, loaded at once, so that a config's imports are the same two lines
and expressions such as ``$selfmedmae_components.optim.effective_lr(...)`` resolve:

    imports:
      - $import selfmedmae_components                  # binds the name (MONAI binds `import a.b` as "a.b")
      - $import selfmedmae_components.config_imports   # loads the modules below

``_target_`` names need no import (MONAI locates them); ``torch``, ``numpy`` and ``monai`` are MONAI's default
config globals."""

from . import (  # noqa: F401
    classification,
    config_helpers,
    distributed,
    engines,
    handlers,
    inference,
    metrics,
    optim,
    probe,
    run_record,
    tracking,
    trained_settings,
    weights,
)
from .data import cache, common, dicom_input, msd  # noqa: F401
from .transforms import brats, cxr, indices  # noqa: F401
from .transforms import msd as msd_transforms  # noqa: F401
