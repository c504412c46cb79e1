"""vitidle: dynamic token idling (IdleViT) for pretrained Vision Transformers.

>>> import vitidle
>>> model = vitidle.convert("deit_tiny", keep=0.7, pretrained=False)   # doctest: +SKIP
>>> vitidle.save(model, "deit_tiny-idle"); vitidle.load("deit_tiny-idle")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .convert import convert  # noqa: E402
from .errors import VitidleError  # noqa: E402
from .idle import TokenSelector, freeze, idle_selectors  # noqa: E402
from .io import load, save  # noqa: E402
from .train import finetune  # noqa: E402
from .visualize import visualize  # noqa: E402

__all__ = ["convert", "load", "save", "finetune", "freeze", "TokenSelector", "idle_selectors", "VitidleError", "visualize",
           "__version__"]
