"""cxrlab: chest X-ray classification from a folder of images to an evaluated, explained, served model."""

import os as _os

# albumentations asks the network for updates when it is imported unless this is set; this toolkit is
# offline-first, so the default is "don't ask" (a user can still set it to 0).
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

RESEARCH_NOTICE = "For research use only: not a medical device and not for diagnosis."
