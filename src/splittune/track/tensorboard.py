"""TensorBoard, through ``torch.utils.tensorboard``'s writer: event files in ``RUN_DIR/tensorboard``.

Steps go under ``train/…`` (``client{i}/train/…`` when the run has several clients), evaluations under
``eval/…``, at the run's step; the resolved config as a text summary and the summary's numbers under
``summary/…``; the run's plots as images; later, an attack's scores under ``attack/NAME/…``. ``tensorboard --logdir
runs`` then compares every run side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import Tracker, TrackingError, register, remember, scalars

DIR = "tensorboard"


@register("tensorboard")
class TensorBoard(Tracker):
    def __init__(self, out: Path, several: bool, resume: bool = False):
        super().__init__(out, several, resume)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackingError("report_to: tensorboard needs the tensorboard package: pip install 'splittune[tracking]'") from None
        self.writer = SummaryWriter(log_dir=str(out / DIR))
        if not resume:
            remember(out, self.name, {"logdir": DIR})

    def step(self, row: dict[str, Any]) -> None:
        prefix = f"client{row['client']}/train" if self.several else "train"
        for key, value in scalars(row).items():
            self.writer.add_scalar(f"{prefix}/{key}", value, row["step"])

    def evaluation(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(f"eval/{key}", value, row["step"])

    def finish(self, config: dict[str, Any], summary: dict[str, Any], plots: list[Path]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        for key, value in scalars(summary, skip=()).items():
            self.writer.add_scalar(f"summary/{key}", value, int(summary.get("steps", 0)))
        for plot in plots:
            self._image(plot)

    def _image(self, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            self.writer.add_image(f"plots/{path.stem}", np.asarray(image.convert("RGB")), dataformats="HWC")

    def attack(self, name: str, scores: dict[str, float], step: int) -> None:
        for key, value in scores.items():
            self.writer.add_scalar(f"attack/{name}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()
